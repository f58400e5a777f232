# Mayhem in a small container: build with the Rust image, run on distroless/cc (glibc and
# libgcc_s only, which is all the binary links against; tests/ops.rs checks that with ldd).
#
#   make container            # docker build -t mayhem .
#   docker run --rm -e MAYHEM_MESSAGES=1000 -e MAYHEM_REPORT=json mayhem
#
# Configuration comes only from MAYHEM_* environment variables; logs go to stderr, the report
# to stdout; nothing is written to disk, so the root file system can be read-only.

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
COPY tests ./tests
RUN cargo build --release --locked --bin mayhem

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/mayhem /usr/local/bin/mayhem
USER nonroot:nonroot
# docker stop sends SIGTERM and waits 10 s before SIGKILL: the 5 s grace period, the 1 s given
# to cancelled handlers and the rest of the shutdown fit well inside it.
ENV MAYHEM_GRACE_PERIOD=5s
EXPOSE 9090
# Exec form: mayhem is PID 1 and receives SIGTERM itself (it installs its own handlers, so
# PID 1's default of ignoring signals does not apply).
ENTRYPOINT ["/usr/local/bin/mayhem"]
