# Runnable image of the adalora server (and every adalora command), CUDA torch by default.
#
#   docker build -t adalora .
#   docker run --gpus all -p 50051:50051 -p 9090:9090 -e ADALORA_ADMIN_TOKEN \
#       -v $HOME/.cache/adalora/models/smollm2-135m:/models/base:ro -v $PWD/adapters:/adapters adalora
#
# Admin RPCs (Load/Unload/UploadAdapter): the server listens on 0.0.0.0, so without credentials they are closed
# to every caller (PERMISSION_DENIED, and a warning in the log). Pass the token from the environment as above
# (export ADALORA_ADMIN_TOKEN=... first; `-e NAME` copies it without putting it on the command line), never as a
# flag baked into the image. The store holds at most 8 GiB (--max-store-bytes) and 4 uploads at once.
#
# The default command serves /models/base (any transformers causal LM or encoder folder with its tokenizer)
# and the adapter store /adapters on cuda in bfloat16: gRPC on 50051, Prometheus /metrics and /healthz on 9090;
# the health check reads /healthz. Other commands: docker run adalora inspect /adapters/ID, etc.
#
# Another CUDA build: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 (match the host driver).
# CPU-only image: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t adalora:cpu .
#   then: docker run adalora:cpu serve --base-model /models/base --adapter-dir /adapters --host 0.0.0.0 --device cpu
#
# TLS: mount the PEM files and add them to the serve arguments, e.g. -v $PWD/tls:/tls:ro ... serve ...
#   --tls-cert /tls/server.pem --tls-key /tls/server.key [--tls-client-ca /tls/ca.pem --admin-client-name NAME].
#   /metrics and /healthz stay plain HTTP, so the health check (GET /healthz on the metrics port: 200 while
#   grpc.health.v1 says SERVING, 503 while loading or draining) works with or without TLS. Serving without
#   --metrics-port 9090? Run with --no-healthcheck.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_SPEC=torch
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# torch first, from the chosen index: `pip install .` then keeps it (pyproject only asks torch>=2.1).
RUN pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY adalora_runtime ./adalora_runtime
COPY server ./server
COPY protos ./protos
COPY tools ./tools
RUN pip install . && useradd --create-home --uid 10001 adalora
USER adalora
EXPOSE 50051 8000 9090
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "-c", \
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
ENTRYPOINT ["adalora"]
CMD ["serve", "--base-model", "/models/base", "--adapter-dir", "/adapters", "--host", "0.0.0.0", "--port", "50051", \
     "--http-port", "8000", "--metrics-port", "9090", "--device", "cuda", "--dtype", "bfloat16"]
