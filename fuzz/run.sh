#!/usr/bin/env bash
# `make fuzz`: builds the fuzz targets (cargo-fuzz, AddressSanitizer, debug assertions) and runs
# each for a fixed number of inputs, starting from its seed corpus (fuzz/corpus/<target>) and
# its past crashes (fuzz/regressions/<target>). A crash, a hang (-timeout) or a memory blow-up
# fails the run; the input that did it is left under fuzz/artifacts/<target>/.
#
# FUZZ_RUNS multiplies every target's input count (default 1); FUZZ_TARGETS picks targets;
# FUZZ_SEED sets libFuzzer's seed (default 1; 0 = random).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# Inputs per target, sized so that each takes 20 to 40 s on one core (the block device's
# I/O threads and the vsock sockets make those two the slowest per input).
declare -A RUNS=(
    [virtio_blk]=15000
    [virtio_net_tx]=150000
    [virtio_net_rx]=150000
    [vsock_packet]=120000
    [virtio_rng]=150000
    [virtio_balloon]=150000
    [agent_messages]=50000
)
targets=${FUZZ_TARGETS:-virtio_blk virtio_net_tx virtio_net_rx vsock_packet virtio_rng virtio_balloon agent_messages}
scale=${FUZZ_RUNS:-1}
# A fixed seed keeps the CI gate repeatable; FUZZ_SEED=0 lets libFuzzer pick one (to explore).
seed=${FUZZ_SEED:-1}

# cargo-fuzz needs nightly's -Z flags; without a nightly toolchain, stable takes them with
# RUSTC_BOOTSTRAP (it ships the same sanitizer runtime).
if cargo +nightly --version >/dev/null 2>&1; then
    toolchain=+nightly
else
    toolchain=
    export RUSTC_BOOTSTRAP=1
fi
if ! cargo $toolchain fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

echo "fuzz: building the targets"
(cd fuzz && cargo $toolchain fuzz build --debug-assertions)

# Targets make sockets under the temporary directory (vsock_packet's host side) and cannot
# remove them: libFuzzer ends with exit(). They go with this directory.
scratch=$(mktemp -d -t kubevirt-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT

failed=()
for t in $targets; do
    runs=$((${RUNS[$t]} * scale))
    work=$root/fuzz/target/corpus/$t
    mkdir -p "$work"
    dirs=("$work" "$root/fuzz/corpus/$t")
    [[ -d $root/fuzz/regressions/$t ]] && dirs+=("$root/fuzz/regressions/$t")
    echo "fuzz: $t, $runs inputs"
    start=$SECONDS
    # libFuzzer prints its progress (coverage, corpus, inputs per second) as it goes.
    if (cd fuzz && TMPDIR=$scratch cargo $toolchain fuzz run --debug-assertions "$t" \
        "${dirs[@]}" -- -runs="$runs" -seed="$seed" -timeout=10 -max_len=4096); then
        echo "fuzz: $t passed in $((SECONDS - start)) s"
    else
        echo "fuzz: $t FAILED; the input is under fuzz/artifacts/$t/" >&2
        failed+=("$t")
    fi
done
if ((${#failed[@]})); then
    echo "fuzz: failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: every target passed"
