# syntax=docker/dockerfile:1.7
# Multi-stage: build a wheel (with the schemas and the default model inside), install it into a venv,
# and copy only that venv into a slim runtime image that runs as a non-root user.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip build
# Everything the wheel build reads: pyproject.toml (and the README it names), the package, and the two
# folders pyproject.toml force-includes (schemas -> consumer/_schemas, models -> consumer/_models).
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
COPY models ./models
RUN /opt/venv/bin/python -m build --wheel --outdir /dist . \
 && /opt/venv/bin/pip install --no-cache-dir /dist/*.whl

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="data-shunt" \
      org.opencontainers.image.description="Kafka consumer: small ONNX model first, LLM only for the uncertain reviews"
# A fixed numeric UID/GID: Kubernetes' `runAsNonRoot: true` refuses an image whose USER is a name
# ("cannot verify user is non-root"), and a fixed number lets the manifests pin runAsUser/runAsGroup to it.
RUN groupadd --system --gid 10001 shunt \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin shunt
COPY --from=build /opt/venv /opt/venv
# The admin server keeps its configured default (admin.host = 127.0.0.1): the HEALTHCHECK below runs
# inside the container and uses loopback. Where something outside the container must reach it (kubelet
# probes via the pod IP, a published compose port), the manifest sets SHUNT_ADMIN__HOST=0.0.0.0 itself.
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SHUNT_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 \
    SHUNT_ADMIN__PORT=8080 \
    SHUNT_SERVICE__LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["shunt", "run"]
