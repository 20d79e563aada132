# kubevirt-shim: the two commands a newcomer needs are `make demo` and `make test`.
# Every target installs what it needs first (Debian, as root) and caches heavy results
# outside the clone under $(KUBEVIRT_CACHE).

SHELL := /bin/bash
export KUBEVIRT_CACHE ?= /var/cache/kubevirt-shim
CARGO ?= cargo
GUEST_DIR := target/guest

.PHONY: all deps build guest payload test lint fuzz bench demo clean

all: build

# System packages: QEMU (the `qemu` back end and the benchmark peer), kernel source and
# its build tools, binutils for the tiny test guests.
deps:
	@./scripts/deps.sh

BIN_DIR := target/x86_64-unknown-linux-gnu/release
BINARIES := kubevirt-vmm kubevirt-bench kubevirt-min-vmm kubevirt-demo kubevirt-agent \
	containerd-shim-kubevirt-v1

build:
	$(CARGO) build --workspace --release
	@mkdir -p target/release
	@for b in $(BINARIES); do ln -sf ../x86_64-unknown-linux-gnu/release/$$b target/release/$$b; done

# Guest kernel (cached by source version + config fragment) and the pod initramfs with the
# agent as /init (target/guest/initramfs.img; packing it takes a second), the agent built
# for size (the `agent` profile in Cargo.toml).
guest: deps
	@./guest-kernel/build.sh $(GUEST_DIR)
	$(CARGO) build --profile agent -p agent
	@./guest-kernel/initramfs.sh target/x86_64-unknown-linux-gnu/agent/kubevirt-agent $(GUEST_DIR)
	@echo "guest: kernel $(GUEST_DIR)/vmlinux -> $$(readlink -f $(GUEST_DIR)/vmlinux)"
	@echo "guest: initramfs $(GUEST_DIR)/initramfs.img"

# What deploy/install.sh installs on a node (and the installer image carries).
payload: guest build
	@rm -rf target/payload && mkdir -p target/payload/bin target/payload/share
	@cp -L $(BIN_DIR)/containerd-shim-kubevirt-v1 $(BIN_DIR)/kubevirt-vmm target/payload/bin/
	@cp -L $(GUEST_DIR)/vmlinux $(GUEST_DIR)/initramfs.img target/payload/share/
	@echo "payload: target/payload"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

test: deps guest build lint
	$(CARGO) test --workspace --release -- --test-threads=2

# Fuzz targets for the guest-facing device parsers and the agent replies (fuzz/, cargo-fuzz
# on nightly): each runs a fixed number of inputs from its seed corpus; a crash fails.
# FUZZ_RUNS=10 runs ten times as many; build output stays in fuzz/target.
fuzz:
	@./fuzz/run.sh

bench: deps guest build
	$(BIN_DIR)/kubevirt-bench

demo: deps guest build
	@./scripts/demo.sh

clean:
	$(CARGO) clean
