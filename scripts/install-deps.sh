#!/usr/bin/env bash
# Installs what ZeroDrop needs to build and test on Debian bookworm:
# GStreamer 1.22 with its plugin sets and dev headers, ffmpeg, and the tools
# the tests drive. Safe to run again; skips apt when everything is present.
set -euo pipefail

PACKAGES=(
  pkg-config build-essential
  libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev
  gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good
  gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  ffmpeg iproute2 nftables curl python3 openssl unzip
  clang libbpf-dev bpftool linux-libc-dev
)

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${#missing[@]} Debian package(s): ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  if ! $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    # An interrupted earlier install leaves dpkg half-configured: repair once, retry once.
    log "apt-get failed; running dpkg --configure -a and retrying once"
    $SUDO dpkg --configure -a || true
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  log "Debian packages present"
fi

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
