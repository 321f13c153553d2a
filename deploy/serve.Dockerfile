# syntax=docker/dockerfile:1
# Container image of `edgeexit serve` (the cloud offload service): the serve extra, no torch, non-root.
# NOT RUN HERE: these machines have no Docker engine, so this image was never built or started. Checked here
# (tests/test_deploy_files.py): every path it COPYs exists, the pip install pins the serve extra only
# (no extras, so no torch), its ENTRYPOINT + CMD parse as `edgeexit serve` flags, and deploy/healthcheck.py
# answers against a real `edgeexit serve` (plaintext and TLS).
#
# Build from the repository root (deploy/serve.Dockerfile.dockerignore keeps venvs and caches out):
#   docker build -f deploy/serve.Dockerfile -t edgeexit-serve:0.1.0 .
# Run with the bundle mounted read-only (the service only reads it):
#   docker run --rm -p 8001:8001 -p 8002:8002 -v "$PWD/artifacts/camera_resnet.edgeexit:/bundle:ro" edgeexit-serve:0.1.0
# With TLS and a token (secrets mounted read-only; the health check then needs the CA too):
#   docker run ... -v /etc/edgeexit/serve:/run/secrets/edgeexit:ro -e EDGEEXIT_HEALTH_TLS_CA=/run/secrets/edgeexit/ca.crt \
#     edgeexit-serve:0.1.0 /bundle --host 0.0.0.0 --tls-cert /run/secrets/edgeexit/tls.crt \
#     --tls-key /run/secrets/edgeexit/tls.key --token-file /run/secrets/edgeexit/token --metrics-port 8002 --metrics-host 0.0.0.0

# Minor-version tag; pin the digest (python:3.11-slim-bookworm@sha256:...) in your registry mirror: no registry
# was reachable from here to resolve one.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY edgeexit/ edgeexit/
COPY runtime/ runtime/
COPY exporters/ exporters/
COPY devices/ devices/
# The serve extra only: every dependency is pinned (== in pyproject.toml, and constraints.txt for the
# transitive ones). No export extra, so no torch; the next line fails the build if torch slipped in anyway.
RUN python -m venv /opt/edgeexit/venv \
 && /opt/edgeexit/venv/bin/pip install -c constraints.txt '.[serve]' \
 && /opt/edgeexit/venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && /opt/edgeexit/venv/bin/edgeexit serve --help > /dev/null

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/edgeexit/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EDGEEXIT_HEALTH_ADDRESS=127.0.0.1:8001
COPY --from=build /opt/edgeexit/venv /opt/edgeexit/venv
COPY deploy/healthcheck.py /opt/edgeexit/healthcheck.py
# A fixed non-root uid, so Kubernetes' runAsNonRoot can check it and fsGroup can grant secret files.
RUN groupadd --system --gid 10001 edgeexit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin edgeexit
USER 10001:10001
EXPOSE 8001 8002
# SIGTERM: health turns NOT_SERVING, in-flight requests drain (--drain-seconds), exit 0.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "/opt/edgeexit/healthcheck.py"]
ENTRYPOINT ["edgeexit", "serve"]
# The bundle is mounted at /bundle (read-only); listen on all interfaces inside the container. /metrics is
# plain HTTP without auth: publish 8002 only where a firewall or proxy guards it.
CMD ["/bundle", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002", "--metrics-host", "0.0.0.0"]
