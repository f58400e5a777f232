# Mayhem: the two commands a user needs are `make run` and `make test`.
# Pass flags to the service with ARGS, e.g.
# `make run ARGS="--messages 100 --publish-interval 0 --handler-latency 10ms --report json"`.

CARGO ?= cargo
ARGS ?=

.PHONY: run test lint fmt bench soak leakcheck container build clean

## Run the service on its embedded in-memory pub/sub; Ctrl-C stops it cleanly.
## The terminal's SIGINT reaches make as well, which re-raises it after the recipe (make then
## exits 130 whatever the service did), so the recipe prints the service's own exit status;
## its shell traps SIGINT (the service, a new program, gets the default disposition back).
## The build comes first, with its progress shown: on a fresh machine it takes a minute or
## two, which a quiet `cargo run` would spend looking hung.
run:
	$(CARGO) build --release --bin mayhem
	@trap 'true' INT; $${CARGO_TARGET_DIR:-target}/release/mayhem $(ARGS); status=$$?; \
	  echo "mayhem exited with status $$status" >&2; exit $$status

## Everything CI checks: formatting, clippy, docs, unit/integration/doc tests, the examples,
## the RabbitMQ source (features amqp and amqp-tls, off by default: its tests run here with
## --features amqp-tls, which adds the amqps:// tests to the same run, its doc tests with
## --features amqp, which refuses amqps://; clippy runs with each), the interop tests
## (tests/interop.rs: Python producers and consumers, redis-py and pika, against both sources),
## and the Google Cloud Pub/Sub source (feature pubsub, off by default; its tests start the
## emulator). Tests that cannot run here (the Redis tests without redis-server, the RabbitMQ
## tests without rabbitmq-server, the interop tests without them or without python3's redis and
## pika, the Pub/Sub tests without its emulator) skip loudly: each appends a line to
## $(SKIPPED_LOG), counted at the end. MAYHEM_REQUIRE_REDIS=1, MAYHEM_REQUIRE_AMQP=1,
## MAYHEM_REQUIRE_INTEROP=1 and MAYHEM_REQUIRE_PUBSUB=1 (set by .ci/run) turn a skip into a
## failure.
SKIPPED_LOG = $${CARGO_TARGET_DIR:-target}/tmp/skipped.log
test: lint
	@rm -f $(SKIPPED_LOG)
	$(CARGO) test --lib --bins --tests --examples
	$(CARGO) test --doc
	$(CARGO) test --features amqp-tls --lib --bins --test amqp --test interop
	$(CARGO) test --features amqp --doc amqp
	$(CARGO) test --features pubsub --lib --bins --test pubsub
	$(CARGO) test --features pubsub --doc pubsub
	$(CARGO) run --quiet --example embed_sync
	$(CARGO) run --quiet --example embed_smol
	$(CARGO) run --quiet --example embed_json
	@if [ -s $(SKIPPED_LOG) ]; then \
	  echo "SKIPPED: $$(wc -l < $(SKIPPED_LOG)) tests, by reason (MAYHEM_REQUIRE_REDIS=1, MAYHEM_REQUIRE_AMQP=1, MAYHEM_REQUIRE_INTEROP=1 or MAYHEM_REQUIRE_PUBSUB=1 makes a skip fail):"; \
	  sed 's/^[^:]*: //' $(SKIPPED_LOG) | sort | uniq -c; \
	else \
	  echo "Skipped: 0 tests"; \
	fi

## Formatting, clippy with warnings denied (also on the library alone, without features, and
## with the RabbitMQ or the Pub/Sub source only, and with every broker at once: the broker
## kit's dead code and unused imports are checked only then), and rustdoc with warnings denied.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features amqp -- -D warnings
	$(CARGO) clippy --all-targets --features amqp-tls -- -D warnings
	$(CARGO) clippy --all-targets --features pubsub -- -D warnings
	$(CARGO) clippy --all-targets --features amqp,pubsub -- -D warnings
	$(CARGO) clippy --lib --no-default-features --features pubsub -- -D warnings
	$(CARGO) clippy --lib --no-default-features -- -D warnings
	$(CARGO) clippy --lib --no-default-features --features amqp -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --quiet --features amqp-tls,pubsub

fmt:
	$(CARGO) fmt --all

build:
	$(CARGO) build --release

## Benchmarks of the real pipeline against a bare channel + executor baseline, with the Redis,
## RabbitMQ and Pub/Sub rows (each printed as not measured when its server is not installed;
## MAYHEM_PUBSUB_PYTHON names a Python with google-cloud-pubsub for the streaming-pull row;
## unset, the bench takes the one .ci/run installs in target/pubsub-venv when it is there).
## The bench builds in a target directory of its own (target/bench): its build (with amqp)
## would otherwise replace the default build's binary in target/release, which `make run`
## runs and whose size the bench reports.
PUBSUB_VENV_PYTHON = $(wildcard $(CURDIR)/target/pubsub-venv/bin/python)
bench:
	$(CARGO) build --release --bin mayhem
	$(if $(MAYHEM_PUBSUB_PYTHON),,$(if $(PUBSUB_VENV_PYTHON),MAYHEM_PUBSUB_PYTHON=$(PUBSUB_VENV_PYTHON))) MAYHEM_BENCH_BINARY=$${CARGO_TARGET_DIR:-target}/release/mayhem CARGO_TARGET_DIR=$${CARGO_TARGET_DIR:-target}/bench $(CARGO) bench --features amqp,pubsub --bench pipeline

## Chaos soak: 500 randomized fault runs (binary and library), an overload run, a summary;
## then randomized fault runs on Redis (REDIS_ARGS, e.g. "--runs 50 --seed 7"), then on
## RabbitMQ (AMQP_ARGS, e.g. "--runs 20 --seed 7"; the binary is built again with the feature
## amqp for them, each run starts a rabbitmq-server of its own), then on the Pub/Sub emulator
## (PUBSUB_ARGS, e.g. "--runs 8 --seed 7"; built with the feature pubsub; each job starts an
## emulator of its own; the default 6 runs of 5 waves take about 70 s).
RABBITMQ_SERVER = /usr/lib/rabbitmq/bin/rabbitmq-server
PUBSUB_EMULATOR = /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
soak:
	$(CARGO) build --release --bins --examples
	./target/release/examples/soak $(ARGS)
	@if command -v redis-server >/dev/null 2>&1; then \
	  ./target/release/examples/redis_soak $(REDIS_ARGS); \
	else \
	  echo "SKIPPED: the Redis soak (redis-server not installed)"; \
	fi
	@if [ -x $(RABBITMQ_SERVER) ]; then \
	  $(CARGO) build --release --features amqp --bins --examples && \
	  ./target/release/examples/amqp_soak $(AMQP_ARGS); \
	else \
	  echo "SKIPPED: the RabbitMQ soak ($(RABBITMQ_SERVER) not installed)"; \
	fi
	@if [ -x $(PUBSUB_EMULATOR) ]; then \
	  $(CARGO) build --release --features pubsub --bins --examples && \
	  ./target/release/examples/pubsub_soak $(PUBSUB_ARGS); \
	else \
	  echo "SKIPPED: the Pub/Sub soak ($(PUBSUB_EMULATOR) not installed)"; \
	fi

## Valgrind on a counted run and on a SIGTERM shutdown: fails on any definite or indirect leak.
VALGRIND = valgrind --quiet --leak-check=full --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect --error-exitcode=3
leakcheck:
	$(CARGO) build --bin mayhem
	$(VALGRIND) ./target/debug/mayhem --messages 300 --publish-interval 0 --handler-latency 2ms --log-level warn --report json >/dev/null
	$(VALGRIND) ./target/debug/mayhem --publish-interval 1ms --handler-latency 20ms --log-level warn --report json >/dev/null & pid=$$!; \
	  sleep 3; kill -TERM $$pid; wait $$pid

## The container image: the static (musl) binary alone in a non-root scratch image, built with
## podman from container/Containerfile (the Dockerfile builds the same image with docker).
IMAGE ?= mayhem
MUSL_TARGET = x86_64-unknown-linux-musl
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# crun refuses the hybrid cgroups of some hosts; runc with cgroupfs works on them.
PODMAN ?= podman --runtime runc --cgroup-manager=cgroupfs
container:
	$(CARGO) build --release --locked --target $(MUSL_TARGET) --bin mayhem
	rm -rf $(TARGET_DIR)/container && mkdir -p $(TARGET_DIR)/container
	cp $(TARGET_DIR)/$(MUSL_TARGET)/release/mayhem $(TARGET_DIR)/container/mayhem
	$(PODMAN) build --quiet --tag $(IMAGE) --file container/Containerfile $(TARGET_DIR)/container

clean:
	$(CARGO) clean
