# Mayhem's container image, for your own `docker build -t mayhem .` (or `podman build`).
#
# Stage 1 builds a static binary (musl, no dynamic loader, no libc at run time); stage 2 is
# the runtime image: that binary alone in an empty (`scratch`) image, run as a non-root user.
# `make container` builds the same runtime stage (container/Containerfile) around a binary
# built on the host, and tests/container.rs checks that the two runtime stages are identical.
#
# Pin the builder by digest for a reproducible build. The project machine reaches no image
# registry, so no digest could be read and checked there, and none is made up here: look it up
# with `docker buildx imagetools inspect rust:1.95-slim-bookworm` (or `skopeo inspect`) and
# write it as `rust:1.95-slim-bookworm@sha256:<digest>`. The runtime stage needs no pin:
# `scratch` is no image, only the empty file system.
#
#   docker build -t mayhem .
#   docker run --rm -e MAYHEM_MESSAGES=1000 -e MAYHEM_PUBLISH_INTERVAL=1ms \
#       -e MAYHEM_HANDLER_LATENCY=10ms -e MAYHEM_REPORT=json mayhem

FROM docker.io/library/rust:1.95-slim-bookworm AS build
WORKDIR /src
# The target is added before the sources are copied, so that the layer is cached.
RUN rustup target add x86_64-unknown-linux-musl
# Only what the binary is built from: no tests, benchmarks, examples or CI scripts.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest's [patch] names it; cargo reads it even for a build without RabbitMQ.
COPY vendor ./vendor
# Cargo reads every target the manifest declares before it builds one, so the files of the
# explicitly declared test and benchmark must exist: empty ones stand in for them.
RUN mkdir tests benches && touch tests/redis.rs benches/pipeline.rs
RUN cargo build --release --locked --target x86_64-unknown-linux-musl --bin mayhem \
    && mkdir /out && cp target/x86_64-unknown-linux-musl/release/mayhem /out/mayhem

# --- runtime stage: identical in Dockerfile and container/Containerfile ---
FROM scratch
COPY --from=build /out/mayhem /mayhem
# The nobody user and group: no passwd file is needed for numeric ids.
USER 65534:65534
# docker and podman stop send SIGTERM and wait 10 s before SIGKILL: the 5 s grace period, the
# 1 s given to cancelled handlers and the rest of the shutdown fit well inside it.
ENV MAYHEM_GRACE_PERIOD=5s
# The metrics endpoint, when MAYHEM_METRICS_ADDR=0.0.0.0:9090 turns it on.
EXPOSE 9090
# Exec form: mayhem is PID 1 and receives SIGTERM itself (it installs its own handlers, so
# PID 1's default of ignoring signals does not apply).
ENTRYPOINT ["/mayhem"]
