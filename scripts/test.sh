#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: unit, property, integration
# and end-to-end (real GStreamer peers, real zerodrop processes).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)" >&2; }

# Incremental compilation only pays off for repeated local builds; in a
# one-shot run it costs gigabytes of disk for nothing.
if [ "${CI:-}" = true ]; then export CARGO_INCREMENTAL=0; fi
step "disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free here (a cold build and test run needs about 15 GB)"

step "installing dependencies"
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "building the Kubernetes control plane from Go modules (cached by version under ~/.cache/zerodrop; a cold build takes 10-30 min)"
bash scripts/controlplane.sh build
eval "$(bash scripts/controlplane.sh env)"

step "building MediaMTX from its Go module for the RTSP interop test (cached by version under ~/.cache/zerodrop; a cold build takes about 1.5 min)"
bash scripts/mediamtx.sh build

step "building the workspace"
cargo build --workspace --all-targets --locked

step "running the test suite"
# Tests share UDP ports and CPU-heavy GStreamer pipelines on small machines:
# keep end-to-end tests one at a time. The eBPF tests need root; under CI
# (CI=true) a skipped kernel test is a failure.
cargo test --workspace --locked --no-fail-fast -- --test-threads=1
