# The two commands: `make run` (the demo) and `make test` (everything the tests need, then
# every test). The other targets are the pieces they use.

CARGO ?= cargo
MICRO_REGISTRY ?= mdns
export MICRO_REGISTRY

.PHONY: build build-deps run test test-deps lint fmt clean docker-check bench bench-peers

## build-deps: install what building needs beyond Rust (protoc, for the etcd client crate).
build-deps:
	scripts/install-build-deps

## build: every binary of the workspace (debug).
build: build-deps
	$(CARGO) build --workspace --bins

## run: check its variables, build, then the shippy demo in a private network namespace (MICRO_REGISTRY=mdns|consul|etcd, MICRO_BROKER=registry|nats|rabbitmq).
run:
	@scripts/check-run-vars
	@$(MAKE) --no-print-directory build
	@if [ "$(MICRO_REGISTRY)" = consul ]; then scripts/install-consul; fi
	@if [ "$(MICRO_REGISTRY)" = etcd ] && ! command -v etcd >/dev/null; then scripts/install-test-deps; fi
	@if [ "$(MICRO_BROKER)" = nats ] && ! command -v nats-server >/dev/null; then scripts/install-test-deps; fi
	@if [ "$(MICRO_BROKER)" = rabbitmq ] && [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then scripts/install-test-deps; fi
	scripts/netns-run scripts/demo

## test-deps: install what the tests need (iproute2, util-linux, curl, etcd, dnsmasq, nats-server, rabbitmq-server, postgresql, python3-grpcio, golang-go and golang-google-grpc-dev, openssl, a Consul agent).
test-deps:
	scripts/install-test-deps

## test: install the test dependencies, build, then run every test binary (TEST_JOBS at a time, default 4) in a private network namespace.
test: build-deps test-deps
	$(CARGO) build --workspace --bins --tests
	scripts/netns-run env CARGO_NET_OFFLINE=true scripts/run-tests

## lint: formatting and clippy, warnings as errors.
lint: build-deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

## docker-check: the docker/ files against the binaries' flags; `docker compose config` too when the client is here.
docker-check: build-deps
	$(CARGO) test -p e2e --test docker_files -- --nocapture

## bench: release build, then the SDK against its baselines in a private network namespace (about 250 s; the run stops itself at 360 s); writes bench/results.md.
bench: build-deps
	scripts/install-consul >/dev/null
	$(CARGO) build --release -p bench -p vessel-service -p consignment-service -p e2e -p micro-cli
	scripts/netns-run target/release/micro-bench --results bench/results.md

## bench-peers: the SDK against volo-grpc (bench/peers, built on its own into target/peers); writes bench/peers/results.txt.
bench-peers: build-deps
	$(CARGO) build --release -p vessel-service
	$(CARGO) build --release --manifest-path bench/peers/Cargo.toml --target-dir target/peers
	scripts/netns-run target/peers/release/micro-bench-peers > target/peers/results.txt
	mv target/peers/results.txt bench/peers/results.txt
	cat bench/peers/results.txt

## fmt: format the code.
fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf .tools target/demo
