#!/usr/bin/env python3
"""Plots the ZeroDrop Grafana dashboard's panels from real Prometheus data.

This is not Grafana. e2e/tests/prometheus_dashboards.rs runs every query of
charts/zerodrop/dashboards/zerodrop.json (variables at "All",
$__rate_interval = 30s) through a real Prometheus that scrapes a real
`zerodrop run`, the node agent and the operator while loss, repair, FEC,
kernel drops and a failing reconcile happen; with ZERODROP_DASHBOARD_DUMP=DIR
it saves each panel's last two minutes (query_range, 1 s step) to
DIR/dashboard-data.json. This script lays those results out like the
dashboard (its gridPos, titles, units, legend formats) with matplotlib:

    ZERODROP_DASHBOARD_DUMP=/tmp/zd-dash cargo test -p zerodrop-e2e \\
        --test prometheus_dashboards -- --test-threads=1
    python3 scripts/dashboard-png.py /tmp/zd-dash/dashboard-data.json docs/dashboard.png

Needs matplotlib (pip install matplotlib).
"""

import datetime
import json
import math
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

BG = "#111217"
PANEL = "#181b1f"
TEXT = "#ccccdc"
GRID = "#2c3235"
COLORS = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0", "#37872d", "#fade2a"]
UNIT_H_PX = 30  # Grafana's grid row height
WIDTH_PX = 1800  # 24 columns


def si(v, suffix=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= factor:
            return f"{v / factor:.3g} {prefix}{suffix}".rstrip()
    return f"{v:.3g} {suffix}".rstrip() if a >= 0.01 or v == 0 else f"{v:.2g} {suffix}".rstrip()


def fmt(v, unit):
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "—"
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "s":
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        return f"{v:.3g} s"
    if unit == "bps":
        return si(v, "b/s")
    if unit == "bytes":
        return si(v, "B")
    if unit in ("pps", "fps", "ops"):
        return si(v, {"pps": "p/s", "fps": "fps", "ops": "ops/s"}[unit])
    return si(v)


def legend(fmt_str, labels):
    if not fmt_str:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt_str).strip()


def last_value(series):
    for t, v in reversed(series.get("values", [])):
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            return v
    return None


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    data = json.load(open(sys.argv[1]))
    panels = data["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    header = 3  # grid units for the title band
    total = rows + header
    height_px = total * UNIT_H_PX
    dpi = 100
    fig = plt.figure(figsize=(WIDTH_PX / dpi, height_px / dpi), dpi=dpi, facecolor=BG)
    start = datetime.datetime.fromtimestamp(data["start"], datetime.timezone.utc)
    end = datetime.datetime.fromtimestamp(data["end"], datetime.timezone.utc)
    fig.text(
        0.01, 1 - 1.0 / total, f"{data['dashboard']} — Namespace: All · Pipeline: All · Stream: All · "
        f"{start:%H:%M:%S}–{end:%H:%M:%S} UTC", color=TEXT, fontsize=15, weight="bold", va="center",
    )
    fig.text(
        0.01, 1 - 2.1 / total,
        "Not Grafana: the dashboard's own queries, run through a real Prometheus scraping real processes "
        "by e2e/tests/prometheus_dashboards.rs, plotted by scripts/dashboard-png.py",
        color="#8e8e8e", fontsize=10, va="center",
    )
    from matplotlib.patches import Rectangle

    col_px = WIDTH_PX / 24

    def frac(x_px, y_px, w_px, h_px):
        """Figure fractions [left, bottom, width, height] of a box given in
        pixels from the top left corner."""
        return [x_px / WIDTH_PX, 1 - (y_px + h_px) / height_px, w_px / WIDTH_PX, h_px / height_px]

    for p in panels:
        g = p["gridPos"]
        x, y = g["x"] * col_px + 4, (g["y"] + header) * UNIT_H_PX + 4
        w, h = g["w"] * col_px - 8, g["h"] * UNIT_H_PX - 8
        if p["type"] == "row":
            fig.text(x / WIDTH_PX, 1 - (y + h / 2) / height_px, p["title"], color=TEXT, fontsize=13, weight="bold", va="center")
            continue
        left, bottom, width, height = frac(x, y, w, h)
        fig.patches.append(Rectangle((left, bottom), width, height, transform=fig.transFigure, facecolor=PANEL, edgecolor=GRID, lw=0.8, zorder=-10))
        fig.text((x + 8) / WIDTH_PX, 1 - (y + 14) / height_px, p["title"], color=TEXT, fontsize=10.5, weight="bold", va="center")
        unit = p.get("unit")
        targets = p.get("targets", [])
        if p["type"] in ("stat", "table"):
            ax = fig.add_axes(frac(x + 8, y + 28, w - 16, h - 36))
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
        if p["type"] == "stat":
            values = [last_value(s) for t in targets for s in t["series"]]
            values = [v for v in values if v is not None]
            v = values[0] if values else None
            bad = v is not None and v > 0 and p["title"] != "Streams up"
            ax.set_facecolor("#5c1e24" if bad else "#1e3b23")
            ax.text(0.5, 0.45, fmt(v, unit), color="white", fontsize=26, weight="bold", ha="center", va="center", transform=ax.transAxes)
            continue
        if p["type"] == "table":
            ax.set_facecolor(PANEL)
            lines = []
            for t in targets:
                for s in t["series"]:
                    labels = {k: v for k, v in s["labels"].items() if k != "__name__"}
                    lines.append("   ".join(f"{k}={v}" for k, v in labels.items()) + f"   -> {fmt(last_value(s), unit)}")
            for i, line in enumerate(lines[:9]):
                ax.text(0.01, 0.95 - i * 0.11, line, color=TEXT, fontsize=8.5, family="monospace", va="top", transform=ax.transAxes)
            continue
        # timeseries: every series is drawn; the legend names those that
        # were not 0 all along (a count says how many were)
        ax = fig.add_axes(frac(x + 62, y + 30, w - 74, h - 56))
        ax.set_facecolor(PANEL)
        for sp in ax.spines.values():
            sp.set_color(GRID)
        i, zero, lowest = 0, 0, 0.0
        for t in targets:
            for s in t["series"]:
                pts = [(tt, v) for tt, v in s["values"] if v is not None and not math.isnan(v)]
                if not pts:
                    continue
                xs = [tt - data["end"] for tt, _ in pts]
                ys = [v for _, v in pts]
                lowest = min(lowest, min(ys))
                all_zero = all(v == 0 for v in ys)
                zero += all_zero
                ax.plot(xs, ys, color=COLORS[i % len(COLORS)], lw=1.3, label=None if all_zero else legend(t.get("legendFormat"), s["labels"]))
                i += 1
        ax.tick_params(colors="#8e8e8e", labelsize=8)
        ax.grid(color=GRID, lw=0.6)
        if lowest >= 0:
            ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, unit=unit: fmt(v, unit)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f} s"))
        if i:
            handles, labels = ax.get_legend_handles_labels()
            if zero:
                handles.append(plt.Line2D([], [], color="none"))
                labels.append(f"+{zero} series at 0 throughout")
            ax.legend(handles, labels, loc="lower left", fontsize=7, facecolor=PANEL, edgecolor=GRID, labelcolor=TEXT,
                      ncol=2 if len(labels) > 4 else 1, framealpha=0.8)
        else:
            ax.text(0.5, 0.5, "No data", color="#8e8e8e", ha="center", va="center", transform=ax.transAxes)

    fig.savefig(sys.argv[2], facecolor=BG, dpi=dpi)
    print(f"wrote {sys.argv[2]} ({WIDTH_PX}x{height_px} px, {len(panels)} panels)")


if __name__ == "__main__":
    main()
