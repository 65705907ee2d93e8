#!/usr/bin/env bash
# Builds and caches MediaMTX (github.com/bluenviron/mediamtx), the RTSP server
# the e2e test e2e/tests/rtsp_mediamtx.rs publishes into with ffmpeg and pulls
# from with zerodrop. Built from its Go module (the Go module proxy), not a
# release binary.
#
#   scripts/mediamtx.sh build   build it unless the cache has it (idempotent)
#   scripts/mediamtx.sh path    print the path of the binary
#
# The cache is keyed by version: $ZERODROP_CACHE (default ~/.cache/zerodrop)
# /mediamtx-<version>/mediamtx. Nothing is ever written to the repo.
#
# MediaMTX's own build runs `go generate`, which downloads from the internet
# (hls.js's release zip from GitHub, the Raspberry Pi camera binaries) and
# reads the version from .git. None of that is reachable here, so the module
# source is copied to a scratch directory and the generated files are put in
# place instead:
#   internal/core/VERSION           the module version (what versiongetter writes for a tag)
#   internal/servers/hls/hls.min.js dist/hls.min.js of the npm package hls.js, at the
#                                   version MediaMTX pins (hlsjsdownloader/VERSION);
#                                   only served by the HLS server, which the tests turn off
#   rpicamera/mtxrpicam_*           not needed: embedded only under linux/arm(64) build tags
#
# Two of the versions MediaMTX's go.mod requires are refused by the module
# proxy this project may use ("403 Forbidden: This module version is not
# available"), so they are replaced (go mod edit -replace) by versions it has:
#   github.com/bluenviron/gortmplib v0.4.0 => v1.0.1 (the only version listed;
#     RTMP only, which the tests turn off; compiles unchanged against it and
#     moves mediacommon/v2 from v2.9.1 to v2.9.3 by minimal version selection)
#   github.com/pion/ice/v4 v4.2.8-0.20260604162030-72f5001c4596 => v4.2.7 (the
#     release that pseudo-version follows, and what pion/webrtc v4.2.15 requires;
#     WebRTC only, which the tests turn off)
# The RTSP server (gortsplib v5.6.1) is built exactly as MediaMTX pins it.
# A cold build takes about 1.5 minutes on 2 cores (75 s of go build with an empty
# build cache, modules already downloaded); progress is printed every 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."

MEDIAMTX_VERSION=v1.19.2
MODULE=github.com/bluenviron/mediamtx
# module old-version new-version (see the header)
REPLACE=(
  "github.com/bluenviron/gortmplib v0.4.0 v1.0.1"
  "github.com/pion/ice/v4 v4.2.8-0.20260604162030-72f5001c4596 v4.2.7"
)

CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

log() { printf '[mediamtx %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

CACHE="${ZERODROP_CACHE:-$HOME/.cache/zerodrop}/mediamtx-$MEDIAMTX_VERSION"
BIN="$CACHE/mediamtx"

find_go() {
  if command -v go >/dev/null 2>&1; then command -v go
  elif [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go
  else die "Go is not installed (need the Go that $MODULE@$MEDIAMTX_VERSION's go.mod names; /usr/local/go/bin/go or on PATH)"
  fi
}

# --- being polite to benchmarks on a shared 2-core machine --------------------
# (as scripts/controlplane.sh: wait for bench-repair before compiling, pause
# the build while one runs, at most 15 min in all)
bench_running() { pgrep -f '(^|/)[b]ench-repair( |$)' >/dev/null 2>&1; }

wait_for_benchmarks() {
  local waited=0
  while bench_running; do
    if [ "$waited" -ge 900 ]; then log "a benchmark is still running after 15 min; building anyway (niced)"; return; fi
    [ "$waited" -eq 0 ] && log "a benchmark (bench-repair) is running; waiting for it to end before compiling (up to 15 min)"
    sleep 10; waited=$((waited + 10))
  done
  [ "$waited" -gt 0 ] && log "benchmark ended after ${waited}s of waiting"
  return 0
}

# Runs "$@" niced in its own process group; prints progress every 30 s by
# counting the package names `go build -v` reports.
run_build() { # label total-packages logfile cmd...
  local label=$1 total=$2 logf=$3; shift 3
  local start=$SECONDS paused=0 stopped=0 rc=0
  : >"$logf"
  setsid nice -n 19 "$@" >>"$logf" 2>&1 &
  local pid=$!
  local last=$SECONDS
  while kill -0 "$pid" 2>/dev/null; do
    sleep 5
    if bench_running && [ "$paused" -lt 900 ]; then
      if [ "$stopped" -eq 0 ]; then log "$label: benchmark started; pausing the build"; kill -STOP -- "-$pid" 2>/dev/null || true; stopped=1; fi
      paused=$((paused + 5))
    elif [ "$stopped" -eq 1 ]; then
      log "$label: resuming the build"; kill -CONT -- "-$pid" 2>/dev/null || true; stopped=0
    fi
    if [ $((SECONDS - last)) -ge 30 ]; then
      last=$SECONDS
      local n cur
      n=$(grep -cv -e '^#' -e '^go: ' "$logf" 2>/dev/null || true)
      cur=$(grep -v -e '^#' -e '^go: ' "$logf" 2>/dev/null | tail -n 1 || true)
      log "$label: $((SECONDS - start))s elapsed, ${n} of at most ${total} packages compiled${cur:+ (last: $cur)}$([ "$stopped" -eq 1 ] && echo ', paused while a benchmark runs')"
    fi
  done
  [ "$stopped" -eq 1 ] && kill -CONT -- "-$pid" 2>/dev/null || true
  wait "$pid" || rc=$?
  if [ "$rc" -ne 0 ]; then
    log "$label failed (exit $rc) after $((SECONDS - start))s; last lines of $logf:"
    grep -v '^[a-z0-9.]*/[^ ]*$' "$logf" | tail -n 40 >&2 || tail -n 40 "$logf" >&2
    return "$rc"
  fi
  log "$label: done in $((SECONDS - start))s"
}

# dist/hls.min.js of npm package hls.js@$1, written to $2.
fetch_hlsjs() { # version dest
  local version=$1 dest=$2 tmp
  command -v npm >/dev/null 2>&1 || die "npm is needed to fetch hls.js $version (scripts/install-deps.sh installs it)"
  tmp=$(mktemp -d); CLEANUP+=("$tmp")
  log "fetching hls.js $version from npm (MediaMTX embeds dist/hls.min.js)"
  (cd "$tmp" && npm pack --silent "hls.js@$version" >/dev/null 2>&1) || die "npm pack hls.js@$version failed"
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/dist/hls.min.js || die "hls.js@$version has no dist/hls.min.js"
  install -m 0644 "$tmp/package/dist/hls.min.js" "$dest"
}

build() {
  if [ -x "$BIN" ] && [ "$("$BIN" --version 2>/dev/null)" = "$MEDIAMTX_VERSION" ]; then
    log "mediamtx $MEDIAMTX_VERSION: cached ($BIN)"; return
  fi
  local go dir src hlsjs total; go=$(find_go)
  export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
  mkdir -p "$CACHE/logs"
  log "fetching $MODULE@$MEDIAMTX_VERSION from the Go module proxy"
  local json
  json=$("$go" mod download -json "$MODULE@$MEDIAMTX_VERSION" 2>&1) || die "the Go module proxy refused $MODULE@$MEDIAMTX_VERSION: $json"
  dir=$(printf '%s\n' "$json" | awk -F'"' '$2 == "Dir" { print $4 }')
  [ -n "$dir" ] && [ -f "$dir/main.go" ] || die "go mod download gave no source directory for $MODULE@$MEDIAMTX_VERSION: $json"

  # The module cache is read-only: build in a writable copy.
  src=$(mktemp -d "$CACHE/.build.XXXXXX"); CLEANUP+=("$src")
  cp -r "$dir/." "$src/"
  chmod -R u+w "$src"
  # What `go generate` would have written (see the header).
  printf '%s' "$MEDIAMTX_VERSION" >"$src/internal/core/VERSION"
  hlsjs=$(tr -d '[:space:]' <"$src/internal/servers/hls/hlsjsdownloader/VERSION")
  fetch_hlsjs "${hlsjs#v}" "$src/internal/servers/hls/hls.min.js"

  local r mod old new
  for r in "${REPLACE[@]}"; do
    read -r mod old new <<<"$r"
    grep -q "^[[:space:]]*$mod $old\b" "$src/go.mod" || die "$MODULE@$MEDIAMTX_VERSION's go.mod does not require $mod $old; update REPLACE"
    log "replacing $mod $old (refused by the module proxy) with $new"
    (cd "$src" && "$go" mod edit -replace "$mod=$mod@$new")
  done
  log "downloading the Go modules MediaMTX needs"
  local out
  out=$(cd "$src" && "$go" mod download 2>&1) || die "go mod download in $MODULE@$MEDIAMTX_VERSION failed: $out"
  # The replacements change the module graph: let go record the sums of what
  # it now selects (checked against the checksum database as usual).
  export GOFLAGS="$GOFLAGS -mod=mod"
  total=$(cd "$src" && "$go" list -deps . | wc -l)
  wait_for_benchmarks
  log "building mediamtx $MEDIAMTX_VERSION with $("$go" version | cut -d' ' -f3) (${total} packages; a cold build takes about 1.5 min on 2 cores)"
  (cd "$src" && run_build "go build mediamtx" "$total" "$CACHE/logs/build-mediamtx.log" \
    "$go" build -v -trimpath -ldflags "-s -w" -o "$src/mediamtx.out" .)
  [ -x "$src/mediamtx.out" ] || die "go build did not produce mediamtx"
  local got; got=$("$src/mediamtx.out" --version 2>/dev/null || true)
  [ "$got" = "$MEDIAMTX_VERSION" ] || die "the built mediamtx says its version is '$got', expected $MEDIAMTX_VERSION"
  mv "$src/mediamtx.out" "$BIN"
}

case "${1:-}" in
  build)
    start=$SECONDS
    log "cache: $CACHE"
    build
    log "mediamtx ready at $BIN ($((SECONDS - start))s)"
    ;;
  path) echo "$BIN" ;;
  *)
    echo "usage: $0 build|path" >&2; exit 2 ;;
esac
