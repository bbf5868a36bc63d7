# syntax=docker/dockerfile:1
#
# tandem server image.
#   docker build -t tandem .
#   docker run -p 1234:1234 -v tandem-data:/var/lib/tandem tandem
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.

# ---- build ---------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# sqlx's compile-time checks, if any are used, read the committed .sqlx/ data instead of a database.
ENV SQLX_OFFLINE=true CARGO_INCREMENTAL=0

# The crate downloads and the target dir live in BuildKit cache mounts that outlast this layer, so
# a source change rebuilds only the workspace's own crates, not the dependencies.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin tandem \
 && install -D -m 0755 target/release/tandem /out/tandem

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/tandem --shell /usr/sbin/nologin tandem \
 && install -d -o tandem -g tandem -m 0750 /var/lib/tandem
COPY --from=build /out/tandem /usr/local/bin/tandem

ENV TANDEM_BIND=0.0.0.0:1234 \
    TANDEM_DATA_DIR=/var/lib/tandem
WORKDIR /var/lib/tandem
USER tandem
VOLUME ["/var/lib/tandem"]
EXPOSE 1234

# No curl in the slim image: bash's /dev/tcp asks /healthz on the port of TANDEM_BIND.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["bash", "-c", "exec 3<>\"/dev/tcp/127.0.0.1/${TANDEM_BIND##*:}\" && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q '^HTTP/1\\.[01] 200'"]

# SIGTERM (docker stop) is a graceful shutdown: flush to the store, close clients with 1012.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tandem"]
