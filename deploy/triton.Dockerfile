# syntax=docker/dockerfile:1
# NVIDIA Triton Inference Server image holding a bundle's model repository (the tails and the whole model,
# with the same names, inputs and outputs as `edgeexit serve`: agents point --cloud at its gRPC port unchanged).
# NOT RUN HERE: these machines have no Docker engine and no GPU, so this image was never built or started.
# The same repository runs in the tests on the tritonserver 2.51 binary of the nvidia-pytriton 0.7.0 wheel
# (CPU); 24.10 below is the NGC release of that Triton version. Checked here (tests/test_deploy_files.py):
# the `edgeexit triton-repo` flags below exist, and the path COPY'd exists in the context it writes.
#
# Build: write the repository into a build context of its own, then build from there.
#   edgeexit triton-repo artifacts/camera_resnet.edgeexit --out build/triton/model_repository \
#     --flavour onnx --encoding int8
#   docker build -f deploy/triton.Dockerfile -t edgeexit-triton:camera_resnet build/triton
# Run (GPU):
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 edgeexit-triton:camera_resnet
#
# Use `--flavour onnx` here (onnxruntime_onnx platform: GPU-ready, INT8/FP16 decoded in the graph), with
# `--encoding` equal to the agents' --encoding (Triton admits one datatype per input). It cannot decode zstd:
# agents must not use --compress against it. `--flavour python` is NOT supported by this image: its models
# import edgeexit (Python >= 3.11) in an env with numpy<2, while the 24.10 image's Python is 3.10 and its Python
# backend stub is built for it. Run that flavour with `edgeexit triton` (CPU) or in an image you build for 3.11.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# The repository is read-only at run time: Triton's model control mode is "none" (load all at start).
COPY model_repository/ /models/

# The NGC image ships a non-root user (uid 1000) for this.
USER triton-server
EXPOSE 8000 8001 8002
# Ready = every model loaded; the image has Python but not necessarily curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=3)"]
CMD ["tritonserver", "--model-repository=/models", "--strict-readiness=true", "--exit-on-error=true", \
     "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"]
