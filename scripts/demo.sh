#!/usr/bin/env bash
# The first thing to try: sets up this machine, then runs the local pipeline in
# examples/local-demo.yaml while two test sources stream to it through heavy
# loss (12% random plus bursts). Watch the live table: LOST climbs, DROPPED
# stays at 0. Metrics: http://127.0.0.1:9464/metrics while it runs.
#
#   scripts/demo.sh            # 30 seconds
#   DURATION=120 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-30}"
LOSS="${LOSS:-uniform:0.12+ge:loss=0.03,burst=8}"

bash scripts/install-deps.sh
[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
echo "== building (release)" >&2
cargo build --release --locked -p zerodrop --bin zerodrop 2>&1 | tail -n 2
BIN=target/release/zerodrop

out=$(mktemp -d)
cleanup() { kill "${senders[@]}" 2>/dev/null || true; }
trap cleanup EXIT

$BIN run examples/local-demo.yaml --report "$out/report.json" --table always &
runner=$!
# Wait until every source of the pipeline is receiving.
for _ in $(seq 1 100); do
  curl -fsS http://127.0.0.1:9464/readyz >/dev/null 2>&1 && break
  kill -0 $runner 2>/dev/null || exit 1
  sleep 0.1
done

senders=()
$BIN send --dest 127.0.0.1:5004 --duration "$DURATION" --loss "$LOSS" --seed 1 --quiet 2>"$out/send-1.log" &
senders+=($!)
$BIN send --dest 127.0.0.1:5104 --duration "$DURATION" --loss "$LOSS" --seed 2 --pattern ball --quiet 2>"$out/send-2.log" &
senders+=($!)

# When both sources are done (they linger to answer the last NACKs), stop the
# runner the way a user would: it drains, writes its report and exits 0.
wait "${senders[@]}"
kill -INT $runner
wait $runner
echo
echo "Report: $out/report.json"
python3 - "$out" <<'PY' || true
import json, re, sys
out = sys.argv[1]
r = json.load(open(f"{out}/report.json"))
sent = {}
for i, name in ((1, "cam-1"), (2, "cam-2")):
    m = re.findall(r"sender finished frames=(\d+)", open(f"{out}/send-{i}.log").read())
    sent[name] = int(m[-1]) if m else None
for s in r["streams"]:
    lost = s["packets_lost"]; rep = s["packets_recovered_nack"] + s["packets_recovered_fec"] + s["packets_recovered_reorder"]
    n = sent.get(s["stream"])
    books = s["frames_decoded"] + s["frames_dropped"] + s["frames_skipped_before_keyframe"]
    print(f'{s["pipeline"]}/{s["stream"]}: {s["frames_decoded"]} of {n} frames sent decoded, {s["frames_dropped"]} dropped, '
          f'{s["frames_skipped_before_keyframe"]} skipped ({"books balance" if books == n else "BOOKS DO NOT BALANCE"}); '
          f'{lost} packets lost on the way, {rep} repaired, {s["packets_unrecovered"]} not; decoder {s["decoder"]}')
PY
