# syntax=docker/dockerfile:1
# consignment-cli, with the `micro` command beside it: build from the repository root,
#   docker build -f docker/consignment-cli.Dockerfile -t shippy/consignment-cli .
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
# cache mount, so the binaries are copied out in the same step.
RUN --mount=type=cache,id=shippy-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=shippy-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=shippy-target,target=/src/target,sharing=locked \
    cargo build --release --locked -p consignment-cli --bin consignment-cli \
    && cargo build --release --locked -p micro-cli --bin micro \
    && install -D target/release/consignment-cli /out/consignment-cli \
    && install -D target/release/micro /out/micro

FROM debian:bookworm-slim AS runtime
# A fixed non-root uid, the same in every shippy image.
RUN groupadd --gid 10001 shippy \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /app --shell /usr/sbin/nologin shippy \
    && install -d -o 10001 -g 10001 /app
COPY --from=builder /out/consignment-cli /out/micro /usr/local/bin/
# The example consignment, the CLI's default FILE (relative to the working directory).
COPY consignment-cli/consignment.json /app/consignment.json
WORKDIR /app
USER 10001:10001
# A one-shot client: it serves nothing, so no port and no HEALTHCHECK.
# `docker run … shippy/consignment-cli other.json` submits another file;
# `--entrypoint micro` gives the registry tool (`micro services`, `micro health NAME`).
ENTRYPOINT ["/usr/local/bin/consignment-cli"]
CMD ["consignment.json"]
