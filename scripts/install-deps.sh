#!/usr/bin/env bash
# Installs what ZeroDrop needs to build and test on Debian bookworm:
# GStreamer 1.22 with its plugin sets and dev headers, ffmpeg, and the tools
# the tests drive (among them Prometheus 2.42 and promtool, which the chart's
# alert and dashboard tests run, and Chromium with hls.js from npm, which play
# the HLS output in e2e/tests/hls_browser.rs, and gst-rtsp-server with
# Python's GObject bindings, the RTSP server of e2e/tests/rtsp_ingest.rs, and
# srt-live-transmit, the SRT peer of e2e/tests/srt_ingest.rs). Safe to run again; skips apt when everything
# is present.
set -euo pipefail

PACKAGES=(
  pkg-config build-essential
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  ffmpeg iproute2 nftables curl python3 openssl unzip
  clang libbpf-dev bpftool linux-libc-dev
  prometheus chromium
  python3-gi gir1.2-gst-rtsp-server-1.0 srt-tools
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian's prometheus package starts a Prometheus daemon on :9090 from its
# postinst (invoke-rc.d / deb-systemd-invoke). The tests only need the
# binaries and start their own Prometheus on a free port, so while apt runs a
# policy-rc.d (exit 101: "action forbidden") lets no package start a service.
# One that is already there (container images ship one) is left alone.
POLICY_RC_D=/usr/sbin/policy-rc.d
OWN_POLICY=""
remove_own_policy() { if [ -n "$OWN_POLICY" ]; then $SUDO rm -f "$POLICY_RC_D"; OWN_POLICY=""; fi; }
trap remove_own_policy EXIT

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${#missing[@]} Debian package(s): ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e "$POLICY_RC_D" ]; then
    printf '#!/bin/sh\n# scripts/install-deps.sh: no service starts while it installs packages\nexit 101\n' \
      | $SUDO tee "$POLICY_RC_D" >/dev/null
    $SUDO chmod 755 "$POLICY_RC_D"
    OWN_POLICY=1
  fi
  $SUDO apt-get update -qq
  if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    # An interrupted earlier install leaves dpkg half-configured: repair once, retry once.
    log "apt-get failed; running dpkg --configure -a and retrying once"
    $SUDO dpkg --configure -a || true
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
  remove_own_policy
  if printf '%s\n' "${missing[@]}" | grep -qx prometheus && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    # Under systemd the package also enabled its unit for the next boot.
    log "disabling the packaged prometheus service (the tests run their own)"
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
else
  log "Debian packages present"
fi
log "$(prometheus --version 2>&1 | head -1); promtool at $(command -v promtool)"

if ! command -v cargo >/dev/null 2>&1; then
  [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
  log "cargo not found: install Rust 1.95 (rustup) and run this again"
  exit 1
fi
log "$(cargo --version); GStreamer $(gst-launch-1.0 --version | sed -n 's/^GStreamer //p' | head -1)"
for e in x264enc rtph264pay rtpbin rtprtxsend avdec_h264 h264parse x265enc; do
  gst-inspect-1.0 "$e" >/dev/null 2>&1 || { log "GStreamer element $e is missing"; exit 1; }
done

# hls.js for the browser test, pinned, from npm into target/web (not in git).
HLSJS_VERSION=1.7.4
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
HLSJS_DIR="$ROOT/target/web"
if ! grep -qs "\"version\": \"$HLSJS_VERSION\"" "$HLSJS_DIR/node_modules/hls.js/package.json"; then
  if ! command -v npm >/dev/null 2>&1; then
    log "installing npm (Debian) for hls.js"
    $SUDO apt-get install -y -qq --no-install-recommends npm
  fi
  log "installing hls.js $HLSJS_VERSION from npm into $HLSJS_DIR"
  mkdir -p "$HLSJS_DIR"
  npm install --prefix "$HLSJS_DIR" --no-audit --no-fund --silent "hls.js@$HLSJS_VERSION"
fi
log "hls.js $HLSJS_VERSION at $HLSJS_DIR; $(chromium --version 2>/dev/null | head -1)"
