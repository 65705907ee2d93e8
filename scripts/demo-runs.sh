#!/usr/bin/env bash
# scripts/demo.sh N times in a row (default 3), each run's books written to
# results/demo-runs.json with the commit, whether the tree was clean, the load
# average before each run and the machine: the evidence behind the demo output
# the README shows. Refuses a dirty tree unless ALLOW_DIRTY=1.
#
#   scripts/demo-runs.sh        # three runs of 30 s
#   RUNS=5 scripts/demo-runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-3}"
tree=clean
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  tree=dirty
  [ "${ALLOW_DIRTY:-0}" = 1 ] || { echo "demo-runs: the tree has uncommitted changes (ALLOW_DIRTY=1 to record them as dirty)" >&2; exit 1; }
fi
work=$(mktemp -d)
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
for i in $(seq 1 "$RUNS"); do
  cut -d' ' -f1-3 /proc/loadavg > "$work/load-$i"
  echo "== demo run $i of $RUNS (load average $(cat "$work/load-$i"))" >&2
  t0=$(date +%s.%N)
  bash scripts/demo.sh | tee "$work/out-$i"
  t1=$(date +%s.%N)
  echo "$t0 $t1" > "$work/time-$i"
done
python3 - "$work" "$RUNS" "$tree" "$started" <<'PY'
import json, os, platform, re, subprocess, sys
work, runs, tree, started = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def cpu():
    try:
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        return f"{len(names)} CPU(s) {names[0]}" if names else f"{os.cpu_count()} CPU(s)"
    except OSError:
        return f"{os.cpu_count()} CPU(s)"
gst = subprocess.run(["gst-launch-1.0", "--version"], capture_output=True, text=True).stdout
gst = re.search(r"GStreamer (\S+)", gst)
result = {
    "what": "scripts/demo.sh several times in a row (examples/local-demo.yaml: 300 ms, 8 retries; two 720p30 zerodrop send "
            "sources with --loss uniform:0.12+ge:loss=0.03,burst=8, seeds 1 and 2, 30 s), written by scripts/demo-runs.sh",
    "command": "scripts/demo-runs.sh",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "tree": tree,
    "load_average_before_each_run": [open(f"{work}/load-{i}").read().strip() for i in range(1, runs + 1)],
    "machine": f"{cpu()}, Linux {platform.release()}, GStreamer {gst.group(1) if gst else 'unknown'}",
    "started": started,
    "runs": [],
}
for i in range(1, runs + 1):
    out = open(f"{work}/out-{i}").read()
    report_dir = re.findall(r"Report: (\S+)/report\.json", out)[-1]
    report = json.load(open(f"{report_dir}/report.json"))
    t0, t1 = map(float, open(f"{work}/time-{i}").read().split())
    streams = []
    for s in report["streams"]:
        # scripts/demo.sh's senders: send-1.log streams to cam-1, send-2.log to cam-2.
        n = {"cam-1": 1, "cam-2": 2}.get(s["stream"])
        log = f"{report_dir}/send-{n}.log"
        sent = re.findall(r"sender finished frames=(\d+)", open(log).read()) if n and os.path.exists(log) else []
        keep = ["pipeline", "stream", "frames_decoded", "frames_dropped", "frames_skipped_before_keyframe", "packets_lost",
                "packets_recovered_nack", "packets_unrecovered", "nacks_sent", "nacks_refused", "retransmissions_received",
                "keyframe_requests", "join_to_first_frame_ms"]
        row = {k: s.get(k) for k in keep}
        row["frames_sent"] = int(sent[-1]) if sent else None
        streams.append(row)
    result["runs"].append({"run": i, "duration_s": t1 - t0, "streams": streams, "printed": [l for l in out.splitlines() if l.startswith("demo/")]})
json.dump(result, open("results/demo-runs.json", "w"), indent=1)
open("results/demo-runs.json", "a").write("\n")
for r in result["runs"]:
    for s in r["streams"]:
        print(f'run {r["run"]}: {s["pipeline"]}/{s["stream"]}: {s["frames_decoded"]} of {s["frames_sent"]} decoded, {s["frames_dropped"]} dropped, {s["packets_unrecovered"]} packets unrecovered')
print("demo-runs: wrote results/demo-runs.json")
PY
