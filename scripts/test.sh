#!/usr/bin/env bash
# Sets up a fresh machine and runs every test: unit, property, integration
# and end-to-end (real GStreamer peers, real zerodrop processes).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s (%s)\n' "$*" "$(date +%H:%M:%S)" >&2; }

step "installing dependencies"
bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"

step "checking formatting of the CRD YAML against the types happens in the tests; building"
cargo build --workspace --all-targets --locked 2>&1 | tail -n 3

step "running the test suite"
# Tests share UDP ports and CPU-heavy GStreamer pipelines on small machines:
# keep end-to-end tests one at a time.
cargo test --workspace --locked -- --test-threads=1
