# syntax=docker/dockerfile:1.7
# Multi-stage: build a wheel (with the schemas and the default model inside), install it into a venv,
# and copy only that venv into a slim runtime image that runs as a non-root user.

FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --upgrade pip build
COPY pyproject.toml README.md ./
COPY consumer ./consumer
COPY schemas ./schemas
COPY models ./models
RUN /opt/venv/bin/python -m build --wheel --outdir /dist . \
 && /opt/venv/bin/pip install --no-cache-dir /dist/*.whl

FROM python:3.11-slim AS runtime
LABEL org.opencontainers.image.title="data-shunt" \
      org.opencontainers.image.description="Kafka consumer: small ONNX model first, LLM only for the uncertain reviews"
RUN groupadd --system shunt && useradd --system --gid shunt --home-dir /app --shell /usr/sbin/nologin shunt
COPY --from=build /opt/venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    SHUNT_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 \
    SHUNT_ADMIN__HOST=0.0.0.0 \
    SHUNT_ADMIN__PORT=8080 \
    SHUNT_SERVICE__LOG_FORMAT=json
WORKDIR /app
USER shunt
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["shunt", "run"]
