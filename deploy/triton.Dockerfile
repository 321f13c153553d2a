# syntax=docker/dockerfile:1
# NVIDIA Triton Inference Server image holding a bundle's model repository (the tails and the whole model,
# with the same names, inputs and outputs as `edgeexit serve`: agents point --cloud at its gRPC port unchanged).
# NOT RUN HERE: these machines have no Docker engine and no GPU, so this image was never built or started.
# The same repository runs in the tests on the tritonserver 2.51 binary of the nvidia-pytriton 0.7.0 wheel
# (CPU); 24.10 below is the NGC release of that Triton version. Checked here (tests/test_deploy_files.py):
# the `edgeexit triton-repo` flags below exist, and the path COPY'd exists in the context it writes.
#
# Build: write the repository into a build context of its own, then build from there.
#   edgeexit triton-repo artifacts/camera_resnet.edgeexit --out build/triton/model_repository --flavour onnx
#   docker build -f deploy/triton.Dockerfile -t edgeexit-triton:camera_resnet build/triton
# Run (GPU):
#   docker run --rm --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 edgeexit-triton:camera_resnet
#
# Flavours: `--flavour onnx` (onnxruntime_onnx platform: GPU-ready, INT8 dequantised in the graph; no zstd,
# so agents must not use --compress against it) needs nothing beyond this image. `--flavour python` (decodes
# every wire encoding, zstd included) runs its models in a Python env that must hold numpy<2 (numpy 2 gives
# empty responses with no error), onnxruntime and zstandard: see the commented RUN below.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# Only for --flavour python. The image's Python is 3.10 (Ubuntu 22.04), whose newest onnxruntime is 1.23.2; this
# set resolves for cp310 manylinux (checked here with `pip install --dry-run --python-version 3.10`, not installed).
# The generated config.pbtxt must then not point EXECUTION_ENV_PATH at a path of the build machine.
# RUN python3 -m pip install --no-cache-dir "numpy==1.26.4" "onnxruntime==1.23.2" "zstandard==0.25.0"

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
