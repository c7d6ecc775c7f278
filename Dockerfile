# Runnable image of the adalora command (CUDA torch). Build: docker build -t adalora .
# CPU-only image: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t adalora:cpu .
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_SPEC=torch
ENV PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /app
RUN pip install --index-url ${TORCH_INDEX} "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY adalora_runtime ./adalora_runtime
COPY server ./server
COPY tools ./tools
RUN pip install .
ENTRYPOINT ["adalora"]
CMD ["--help"]
