# syntax=docker/dockerfile:1
# tinker-recovery container image. Operating notes: docs/operations.md ("Container").
#
# Two stages: the first builds a virtualenv, the second copies only that venv onto a clean slim
# base, so no compiler, pip cache or source tree ships. Both stages use the same base image
# because the venv's interpreter is a symlink to /usr/local/bin/python3.11.
# tests/deploy/test_container_layout.py runs this file's ENTRYPOINT + CMD outside a container
# with every path below remapped, so keep paths in JSON-form instructions.
#
# The image holds no key. Mount it at /run/secrets/tinker_api_key owned by the runtime user
# 10001 with mode 0400 (docs/operations.md, "Run as a container"); never world-readable.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# A regular (non-editable) install: the runtime stage has no /src.
RUN /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

FROM python:3.11-slim-bookworm AS runtime
# tini reaps children (command handoffs start process groups) and forwards SIGTERM/SIGHUP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
COPY deploy/container/config.yaml /etc/tinker-recovery/config.yaml
# The state volume belongs to the fixed numeric user, so a --read-only container with this
# volume (or a Kubernetes emptyDir/PVC with fsGroup 10001) is all the daemon ever writes to.
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/tinker-recovery
ENV PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    STATE_DIRECTORY=/var/lib/tinker-recovery \
    TINKER_RECOVERY_HTTP__HOST=0.0.0.0
WORKDIR /var/lib/tinker-recovery
VOLUME ["/var/lib/tinker-recovery"]
USER 10001:10001
EXPOSE 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/venv/bin/tinker-recovery"]
CMD ["run", "--config", "/etc/tinker-recovery/config.yaml"]
