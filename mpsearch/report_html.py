"""The report of a search or a compare: one self-contained HTML file (inline SVG, a few lines of
JavaScript, no network assets) and, on request, matplotlib PNGs of the same four views:

- Pareto fronts (metric against latency), one per target, overlaid; every scored trial a dot;
- the per-layer precision map of the front's configurations;
- the per-layer latency breakdown of the best configuration (per target for a compare);
- the search history: each scored trial's metric and the best so far.

`write_report(DIR)` rebuilds everything from DIR/result.json (and DIR/compare.json when there is
one): `mpsearch report DIR`. Hovering a dot or a bar shows its trial, metric, latency and
precisions (SVG <title>); the trials table sorts by any column when its header is clicked.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpsearch.errors import InvalidConfigError, MissingDependencyError
from mpsearch.result import SearchResult, TrialRecord

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
BITS_COLORS = {2: "#fde0dd", 3: "#fcc5c0", 4: "#fa9fb5", 6: "#f768a1", 8: "#c51b8a", 16: "#7a0177", 32: "#49006a"}
W, H, PAD = 640, 360, 52


def layer_breakdown(cost_model, record: TrialRecord) -> list[dict[str, Any]]:
    """Per-layer latency of a trial's configuration on the cost model's target."""
    return [{"fqn": c.fqn, "latency_us": c.latency_s * 1e6, "transition_us": c.transition_s * 1e6,
             "compute": c.compute, "bound": c.bound if c.supported else "unsupported",
             "precision": f"{c.choice.weight}/{c.choice.activation}"}
            for c in cost_model.breakdown(record.config)]


def _load(out_dir: Path) -> tuple[SearchResult, dict | None]:
    path = out_dir / "result.json"
    if not path.exists():
        raise InvalidConfigError(f"no result.json in {out_dir}: give the output directory of a search or compare")
    result = SearchResult.read(path)
    cmp_path = out_dir / "compare.json"
    if not cmp_path.exists():
        return result, None
    try:
        compare = json.loads(cmp_path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidConfigError(f"{cmp_path}: not a readable compare.json ({e})") from None
    targets = compare.get("targets") if isinstance(compare, dict) else None
    per_target = compare.get("per_target") if isinstance(compare, dict) else None
    if not (isinstance(targets, list) and targets and isinstance(per_target, dict)
            and all(isinstance(per_target.get(t), dict) for t in targets)):
        raise InvalidConfigError(f"{cmp_path}: not a compare.json of mpsearch (its targets and per_target missing)")
    return result, compare


def _series(result: SearchResult, compare: dict | None) -> list[dict[str, Any]]:
    """Per target: scored trials as (latency, metric, trial) points, the front, the breakdown."""
    targets = compare["targets"] if compare else [result.target]
    out = []
    for i, target in enumerate(targets):
        priced = compare["per_target"][target] if compare else None
        points, front_set = [], set(priced["pareto"] if priced else result.pareto)
        for t in result.trials:
            if t.state != "complete":
                continue
            cost = priced["trials"].get(str(t.number)) if priced else None
            if cost is not None and not cost["feasible"]:
                continue
            lat = cost["latency_ms"] if cost is not None else t.latency_ms
            points.append((lat, t.metric, t))
        front = sorted((p for p in points if p[2].number in front_set), key=lambda p: p[0])
        breakdown = priced.get("breakdown") if priced else result.settings.get("breakdown")
        out.append({"target": target, "color": COLORS[i % len(COLORS)], "points": points, "front": front,
                    "breakdown": breakdown or []})
    return out


def _label(t: TrialRecord, lat: float, metric_name: str) -> str:
    bits = ", ".join(f"{f}: {c.weight}/{c.activation}" for f, c in t.config.items())
    return f"trial {t.number}: {metric_name} {t.metric:.4f}, latency {lat:.4g} ms\n{bits}"


def _scale(lo: float, hi: float, a: float, b: float):
    span = (hi - lo) or abs(hi) or 1.0
    return lambda v: a + (v - lo) / span * (b - a)


def _axes(xlabel: str, ylabel: str, xs: Sequence[float], ys: Sequence[float]) -> tuple[list[str], Any, Any]:
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx, sy = _scale(x0, x1, PAD, W - 16), _scale(y0, y1, H - PAD, 16)
    parts = [f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 16}" y2="{H - PAD}" stroke="#444"/>',
             f'<line x1="{PAD}" y1="16" x2="{PAD}" y2="{H - PAD}" stroke="#444"/>',
             f'<text x="{W / 2}" y="{H - 12}" text-anchor="middle">{html.escape(xlabel)}</text>',
             f'<text x="14" y="{H / 2}" transform="rotate(-90 14 {H / 2})" text-anchor="middle">{html.escape(ylabel)}</text>']
    for v, pos in ((x0, sx(x0)), (x1, sx(x1))):
        parts.append(f'<text x="{pos:.1f}" y="{H - PAD + 16}" text-anchor="middle" font-size="11">{v:.4g}</text>')
    for v, pos in ((y0, sy(y0)), (y1, sy(y1))):
        parts.append(f'<text x="{PAD - 4}" y="{pos:.1f}" text-anchor="end" font-size="11">{v:.4g}</text>')
    return parts, sx, sy


def _svg(parts: list[str]) -> str:
    return f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" font-family="sans-serif">' + "".join(parts) + "</svg>"


def pareto_svg(series: list[dict], metric_name: str) -> str:
    pts = [p for s in series for p in s["points"]]
    if not pts:
        return "<p>No scored trial.</p>"
    parts, sx, sy = _axes("latency (ms)", metric_name, [p[0] for p in pts], [p[1] for p in pts])
    for s in series:
        for lat, m, t in s["points"]:
            on = t.number in {f[2].number for f in s["front"]}
            parts.append(f'<circle cx="{sx(lat):.1f}" cy="{sy(m):.1f}" r="{4 if on else 2.5}" fill="{s["color"]}" '
                         f'fill-opacity="{0.9 if on else 0.3}"><title>{html.escape(s["target"] + ": " + _label(t, lat, metric_name))}'
                         "</title></circle>")
        if len(s["front"]) > 1:
            path = " ".join(f"{sx(lat):.1f},{sy(m):.1f}" for lat, m, _ in s["front"])
            parts.append(f'<polyline points="{path}" fill="none" stroke="{s["color"]}" stroke-width="1.5"/>')
    for i, s in enumerate(series):
        parts.append(f'<text x="{W - 20}" y="{30 + 16 * i}" text-anchor="end" fill="{s["color"]}">'
                     f'{html.escape(s["target"])}</text>')
    return _svg(parts)


def history_svg(result: SearchResult) -> str:
    scored = [t for t in result.trials if t.state == "complete"]
    if not scored:
        return "<p>No scored trial.</p>"
    name = result.reference["metric_name"]
    parts, sx, sy = _axes("trial", name, [t.number for t in result.trials], [t.metric for t in scored])
    best, line = None, []
    for t in scored:
        parts.append(f'<circle cx="{sx(t.number):.1f}" cy="{sy(t.metric):.1f}" r="2.5" fill="#1f77b4" fill-opacity="0.5">'
                     f"<title>{html.escape(_label(t, t.latency_ms, name))}</title></circle>")
        best = t.metric if best is None else max(best, t.metric)
        line.append(f"{sx(t.number):.1f},{sy(best):.1f}")
    parts.append(f'<polyline points="{" ".join(line)}" fill="none" stroke="#d62728" stroke-width="1.5"/>')
    return _svg(parts)


def breakdown_svg(series: list[dict]) -> str:
    blocks = []
    for s in series:
        rows = s["breakdown"]
        if not rows:
            continue
        top = max(r["latency_us"] + r["transition_us"] for r in rows) or 1.0
        bar_w = (W - 2 * PAD) / len(rows)
        parts = [f'<text x="{PAD}" y="14">{html.escape(s["target"])}: best trial, per-layer latency (us)</text>']
        for i, r in enumerate(rows):
            h = (H - 2 * PAD) * r["latency_us"] / top
            ht = (H - 2 * PAD) * r["transition_us"] / top
            x = PAD + i * bar_w
            tip = html.escape(f"{r['fqn']} {r['precision']}: {r['latency_us']:.4g} us ({r['compute']}, {r['bound']})"
                              + (f" + conversion {r['transition_us']:.3g} us" if r["transition_us"] else ""))
            parts.append(f'<rect x="{x:.1f}" y="{H - PAD - h:.1f}" width="{max(bar_w - 2, 1):.1f}" height="{h:.1f}" '
                         f'fill="{s["color"]}"><title>{tip}</title></rect>')
            if ht:
                parts.append(f'<rect x="{x:.1f}" y="{H - PAD - h - ht:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                             f'height="{ht:.1f}" fill="#999"><title>{tip}</title></rect>')
        parts.append(f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#444"/>')
        parts.append(f'<text x="{PAD - 4}" y="{2 * PAD - 36}" text-anchor="end" font-size="11">{top:.3g}</text>')
        blocks.append(_svg(parts))
    return "".join(blocks) or "<p>No breakdown recorded.</p>"


def precision_map_html(result: SearchResult, trials: Sequence[TrialRecord]) -> str:
    if not trials:
        return "<p>No configuration on the front.</p>"
    fqns = list(trials[0].config)
    head = "".join(f'<th class="v">{html.escape(f)}</th>' for f in fqns)
    rows = []
    for t in trials:
        cells = "".join(
            f'<td style="background:{BITS_COLORS.get(c.weight.bits, "#eee")}" title="{html.escape(f)}">'
            f"{c.weight.value.replace('int', 'w')}/{c.activation.value.replace('int', 'a')}</td>"
            for f, c in t.config.items())
        rows.append(f"<tr><td>{t.number}</td><td>{t.metric:.4f}</td>{cells}</tr>")
    return (f'<table class="map"><tr><th>trial</th><th>{html.escape(result.reference["metric_name"])}</th>{head}</tr>'
            + "".join(rows) + "</table>")


def trials_table(result: SearchResult) -> str:
    cols = ["number", "state", "metric", "latency_ms", "weight_bytes", "mean_weight_bits", "reason"]
    head = "".join(f"<th onclick=\"sortBy(this)\">{c}</th>" for c in cols)
    rows = []
    for t in result.trials:
        vals = [t.number, t.state, "" if t.metric is None else f"{t.metric:.4f}", f"{t.latency_ms:.4g}",
                t.weight_bytes, f"{t.mean_weight_bits:.2f}", t.reason[:120]]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in vals) + "</tr>")
    return f'<table id="trials"><tr>{head}</tr>' + "".join(rows) + "</table>"


_SCRIPT = """<script>
function sortBy(th) {
  const table = th.closest('table'), i = [...th.parentNode.children].indexOf(th);
  const rows = [...table.rows].slice(1), asc = th.dataset.asc !== '1';
  const key = r => { const v = r.cells[i].textContent; const n = parseFloat(v); return isNaN(n) ? v : n; };
  rows.sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1));
  rows.forEach(r => table.appendChild(r)); th.dataset.asc = asc ? '1' : '0';
}
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; margin: 2em; max-width: 1100px; }
table { border-collapse: collapse; font-size: 12px; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: right; }
th { background: #f4f4f4; cursor: pointer; }
th.v { writing-mode: vertical-rl; }
</style>"""


def verification_html(result: SearchResult) -> str:
    """`mpsearch verify`'s figures: measured beside predicted, and the front of each."""
    v = getattr(result, "verification", None)
    if not v:
        return ""
    name = result.reference["metric_name"]
    w = v["where"]
    where = (f"Measured on {w['host']} ({w['cpu']}; {', '.join(w['features']) or 'no int8 dot-product features'}), "
             f"{w['threads']} thread(s), batch {w['batch_size']}, ONNX Runtime: {w['placement']}.")
    rows = []
    for k, r in v["references"].items():
        rows.append(f"<tr><td>{html.escape(k)}</td><td></td><td>{r['latency_ms']:.4g}</td><td></td>"
                    f"<td>{r['measured_speedup']:.2f}x</td><td>{r['sim_metric']:.4f}</td><td>{r['metric']:.4f}</td>"
                    f"<td>{r['int8_kernels']}</td></tr>")
    pred_pts, meas_pts = [], []
    for n, t in v["trials"].items():
        rec = result.trial(int(n))
        ps = "-" if t["predicted_speedup"] is None else f"{t['predicted_speedup']:.2f}x"
        tag = " (best)" if t["best"] else ""
        rows.append(f"<tr><td>trial {html.escape(n)}{tag}</td><td>{t['predicted_latency_ms']:.4g}</td>"
                    f"<td>{t['latency_ms']:.4g}</td><td>{ps}</td><td>{t['measured_speedup']:.2f}x</td>"
                    f"<td>{t['predicted_metric']:.4f}</td><td>{t['metric']:.4f}</td><td>{t['int8_kernels']}</td></tr>")
        pred_pts.append((t["predicted_latency_ms"], t["predicted_metric"], rec))
        meas_pts.append((t["latency_ms"], t["metric"], rec))
    measured_front = set(v["measured_front"])
    series = [
        {"target": "predicted (cost model, simulated metric)", "color": COLORS[0], "points": pred_pts,
         "front": sorted(pred_pts, key=lambda p: p[0])},
        {"target": "measured (ONNX Runtime latency and metric)", "color": COLORS[1], "points": meas_pts,
         "front": sorted((p for p in meas_pts if p[2].number in measured_front), key=lambda p: p[0])},
    ]
    table = (f"<table><tr><th>configuration</th><th>predicted ms</th><th>measured ms</th><th>predicted vs fp32</th>"
             f"<th>measured vs fp32</th><th>simulated {html.escape(name)}</th><th>ONNX Runtime {html.escape(name)}</th>"
             f"<th>int8 kernels</th></tr>{''.join(rows)}</table>")
    return (f"<h2>Verified on hardware</h2><p>{html.escape(where)}</p>{table}"
            f"{pareto_svg(series, name)}")


def render(result: SearchResult, compare: dict | None) -> str:
    series = _series(result, compare)
    name = result.reference["metric_name"]
    front = [result.trial(n) for n in (compare["per_target"][compare["targets"][0]]["pareto"] if compare
                                       else result.pareto)]
    title = f"mpsearch: {result.task} on {', '.join(s['target'] for s in series)}"
    summary = (f"{len(result.trials)} trials ({sum(t.state == 'complete' for t in result.trials)} scored); "
               f"FP32 {name} {result.reference['fp32_metric']:.4f}; strategy {result.settings.get('strategy')}, "
               f"sampler {result.settings.get('sampler')}, seed {result.settings.get('seed')}")
    table = ""
    if compare:
        rows = "".join(
            f"<tr><td>{html.escape(t)}</td><td>{html.escape(r['budget'])}</td><td>{r['budget_ms']:.4g}</td>"
            f"<td>{'-' if r['trial'] is None else r['trial']}</td>"
            f"<td>{'-' if r['metric'] is None else format(r['metric'], '.4f')}</td>"
            f"<td>{'-' if r['latency_ms'] is None else format(r['latency_ms'], '.4g')}</td>"
            f"<td>{'-' if r['speedup_fp32'] is None else format(r['speedup_fp32'], '.2f') + 'x'}</td>"
            f"<td>{'-' if r['speedup_int8'] is None else format(r['speedup_int8'], '.2f') + 'x'}</td></tr>"
            for t in compare["targets"] for r in compare["per_target"][t]["table"])
        table = ("<h2>Best within each latency budget</h2><table><tr><th>target</th><th>budget</th><th>ms</th>"
                 f"<th>trial</th><th>{html.escape(name)}</th><th>latency ms</th><th>vs fp32</th><th>vs int8</th></tr>"
                 f"{rows}</table>")
    return "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>", _STYLE,
        _SCRIPT, "</head><body>", f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(summary)}</p>", table,
        "<h2>Pareto fronts</h2>", pareto_svg(series, name), verification_html(result),
        f"<h2>Precisions on the front ({html.escape(series[0]['target'])})</h2>", precision_map_html(result, front),
        "<h2>Per-layer latency of the best configuration</h2>", breakdown_svg(series),
        "<h2>Search history</h2>", history_svg(result), "<h2>Trials</h2>", trials_table(result),
        "</body></html>",
    ])


def write_report(out_dir: str | Path, png: bool = False) -> list[Path]:
    """DIR/report.html from DIR/result.json (and compare.json); with png, the four views as
    matplotlib PNGs too. Returns the files written."""
    out_dir = Path(out_dir)
    result, compare = _load(out_dir)
    path = out_dir / "report.html"
    path.write_text(render(result, compare), encoding="utf-8")
    written = [path]
    if png:
        written += write_pngs(out_dir, result, compare)
    return written


def write_pngs(out_dir: Path, result: SearchResult, compare: dict | None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("PNG plots need matplotlib: pip install matplotlib") from None
    series = _series(result, compare)
    name = result.reference["metric_name"]
    files = []

    def save(fig, stem: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=110)
        plt.close(fig)
        files.append(out_dir / f"{stem}.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for s in series:
        ax.scatter([p[0] for p in s["points"]], [p[1] for p in s["points"]], s=8, alpha=0.3, color=s["color"])
        ax.plot([p[0] for p in s["front"]], [p[1] for p in s["front"]], "o-", color=s["color"], label=s["target"])
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(name)
    ax.set_xscale("log")
    ax.legend()
    ax.set_title(f"Pareto fronts: {result.task}")
    save(fig, "pareto")

    front = [result.trial(n) for n in (compare["per_target"][compare["targets"][0]]["pareto"] if compare
                                       else result.pareto)]
    if front:
        fqns = list(front[0].config)
        grid = [[t.config[f].weight.bits for f in fqns] for t in front]
        fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(fqns) + 2), max(2.5, 0.3 * len(front) + 1.5)))
        im = ax.imshow(grid, aspect="auto", cmap="RdPu")
        ax.set_yticks(range(len(front)), [f"{t.number} ({t.metric:.3f})" for t in front], fontsize=7)
        ax.set_xticks(range(len(fqns)), fqns, rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, label="weight bits")
        ax.set_title("weight precision per layer on the front")
        save(fig, "precision_map")

    with_rows = [s for s in series if s["breakdown"]]
    if with_rows:
        fig, axes = plt.subplots(len(with_rows), 1, figsize=(8, 2.4 * len(with_rows)), squeeze=False)
        for ax, s in zip(axes[:, 0], with_rows, strict=True):
            rows = s["breakdown"]
            ax.bar(range(len(rows)), [r["latency_us"] for r in rows], color=s["color"])
            ax.bar(range(len(rows)), [r["transition_us"] for r in rows],
                   bottom=[r["latency_us"] for r in rows], color="#999")
            ax.set_ylabel("us")
            ax.set_title(f"{s['target']}: best configuration, per-layer latency", fontsize=9)
            ax.set_xticks(range(len(rows)), [r["fqn"] for r in rows], rotation=90, fontsize=6)
        save(fig, "latency_breakdown")

    scored = [t for t in result.trials if t.state == "complete"]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.scatter([t.number for t in scored], [t.metric for t in scored], s=8, alpha=0.5)
        best, line = None, []
        for t in scored:
            best = t.metric if best is None else max(best, t.metric)
            line.append(best)
        ax.plot([t.number for t in scored], line, color="#d62728", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel(name)
        ax.legend()
        ax.set_title("search history")
        save(fig, "history")
    return files
