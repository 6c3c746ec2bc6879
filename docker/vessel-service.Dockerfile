# syntax=docker/dockerfile:1
# vessel-service: build from the repository root,
#   docker build -f docker/vessel-service.Dockerfile -t shippy/vessel-service .
# The three shippy Dockerfiles share one builder layout (same paths and cache ids), so
# building one after another reuses the compiled dependencies.

# The workspace's rust-version; the builder may be newer, never older.
ARG RUST_VERSION=1.88

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# protoc for the etcd client crate's build script (the project's own protos need none).
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler && rm -rf /var/lib/apt/lists/*
COPY . .
# protox compiles the .proto files in Rust: no protoc to install. The target dir is a
# cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,id=shippy-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=shippy-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=shippy-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p vessel-service --bin vessel-service \
    && install -D target/release/vessel-service /out/vessel-service

FROM debian:bookworm-slim AS runtime
# A fixed non-root uid, the same in every shippy image. /data holds the bookings database
# (with its -wal and -shm files); a fresh named volume takes this owner from the image.
RUN groupadd --gid 10001 shippy \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin shippy \
    && install -d -o 10001 -g 10001 /app /data
COPY --from=builder /out/vessel-service /usr/local/bin/vessel-service
WORKDIR /app
USER 10001:10001
VOLUME /data
# A fixed port inside the container; the announced address is the container's eth0
# address (see docker/README.md). Metrics on every interface, so peers can scrape them.
ENV VESSEL_DB=/data/vessels.db \
    MICRO_SERVER_ADDRESS=0.0.0.0:50051 \
    MICRO_METRICS_ADDRESS=0.0.0.0:9090
EXPOSE 50051 9090
# No HEALTHCHECK: `micro health NAME` asks the registry for every instance of a name, so
# it cannot tell whether this container's own instance serves. Liveness is the registry's
# TTL check (see docker/README.md).
ENTRYPOINT ["/usr/local/bin/vessel-service"]
