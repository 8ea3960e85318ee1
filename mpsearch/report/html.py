"""The report of a search or a compare: Plotly figures built from one data model (`report_data`),
as one self-contained HTML file (plotly.js embedded once, no network request) and as PNGs for
MLflow (the same figures, drawn by kaleido in a headless Chrome/Chromium).

Views (`figures`):
- pareto: per target, every scored trial, the Pareto front, the best configuration and the FP32
  and uniform-int8 reference points; hovering a point shows its trial, metric, latency, speed-up
  over FP32 and configuration;
- precision_map: the weight and the activation precision of every layer of each front
  configuration, a colour per precision with its legend;
- latency_breakdown: the best configuration's per-layer latency per target, layer names on the
  axis, compute and precision conversion (QuantizeLinear/DequantizeLinear) stacked;
- history: each scored trial's metric, the best so far and FP32's;
- verification (after `mpsearch verify`): measured latency beside predicted, per configuration.
The HTML adds the budget table of a compare, the verification table and the trials table (speed-up,
the metric by its name, Pareto and best markers, the configuration), sortable by any column.

`write_report(DIR)` rebuilds everything from DIR/result.json (and DIR/compare.json when there is
one): `mpsearch report DIR`.
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import InvalidConfigError, MissingDependencyError
from mpsearch.report.text import ci
from mpsearch.results.records import SearchResult, TrialRecord, speedup

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
# one colour per precision, fewest bits darkest (colour-blind safe: Viridis, then greys for float)
PRECISION_COLORS = {"int2": "#440154", "int3": "#46327e", "int4": "#365c8d", "int6": "#277f8e", "int8": "#1fa187",
                    "int16": "#4ac16d", "fp8_e4m3": "#a0da39", "fp16": "#fde725", "bf16": "#fdc328",
                    "fp32": "#e8e8e8"}
SHORT = {"fp8_e4m3": "f8", "fp16": "f16", "bf16": "bf16", "fp32": "f32"}
WIDTH = 1400  # the PNGs' width in pixels; the HTML's figures fill the page
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}
FIGURES = ("pareto", "precision_map", "latency_breakdown", "history", "verification")


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


# -- the data model ------------------------------------------------------------------------------

def _e(text: Any) -> str:
    """Text for a figure: Plotly reads a few HTML tags in labels, so names are escaped."""
    return html.escape(str(text), quote=False)


def config_summary(t: TrialRecord) -> str:
    """A configuration in a line: its weight/activation pairs with how many layers have each."""
    counts = Counter(f"{c.weight.value}/{c.activation.value}" for c in t.config.values())
    return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items(), key=lambda kn: (-kn[1], kn[0])))


def report_data(result: SearchResult, compare: dict | None) -> dict[str, Any]:
    """Everything the report shows, once: every figure and table is drawn from this.

    targets: per target its name, colour, FP32 and uniform-int8 references, scored points
    ({trial, latency_ms, metric, speedup, front, best}), front and best trial numbers and the best
    configuration's per-layer latency; front: the first target's front configurations, fastest
    first; trials: every trial's row."""
    ref = result.reference
    names = compare["targets"] if compare else [result.target]
    targets = []
    for i, name in enumerate(names):
        if compare:
            pt = compare["per_target"][name]
            priced = {int(k): v for k, v in pt["trials"].items()}
            fp32_ms, int8_ms = pt["reference"].get("fp32_latency_ms"), pt["reference"].get("int8_latency_ms")
            front, breakdown = list(pt["pareto"]), pt.get("breakdown") or []
            best = _best_of(compare, result, name)
        else:
            priced = {}
            fp32_ms, int8_ms = ref.get("fp32_latency_ms"), ref.get("int8_latency_ms")
            front, best, breakdown = list(result.pareto), result.best, result.settings.get("breakdown") or []
        points = []
        for t in result.trials:
            cost = priced.get(t.number)
            if t.state != "complete" or (cost is not None and not cost["feasible"]):
                continue
            lat = cost["latency_ms"] if cost is not None else t.latency_ms
            points.append({"trial": t.number, "latency_ms": lat, "metric": t.metric, "speedup": speedup(fp32_ms, lat),
                           "front": t.number in front, "best": t.number == best, "config": config_summary(t)})
        targets.append({
            "name": name, "color": COLORS[i % len(COLORS)], "points": points, "front": front, "best": best,
            "breakdown": breakdown, "priced": priced,
            "fp32": {"latency_ms": fp32_ms, "metric": ref.get("fp32_metric")},
            "int8": ({"latency_ms": int8_ms, "metric": ref.get("int8_metric")}
                     if int8_ms is not None and ref.get("int8_metric") is not None else None),
        })
    first = targets[0]
    by_latency = {p["trial"]: p["latency_ms"] for p in first["points"]}
    front = sorted(first["front"], key=lambda n: (by_latency.get(n, math.inf), n))
    s = result.settings
    summary = (f"{len(result.trials)} trials ({sum(t.state == 'complete' for t in result.trials)} scored); "
               f"FP32 {ref['metric_name']} {ref['fp32_metric']:.4f}; strategy {s.get('strategy')}, "
               f"sampler {s.get('sampler')}, seed {s.get('seed')}, batch size {s.get('batch_size', 1)}")
    return {"task": result.task, "metric_name": ref["metric_name"], "targets": targets, "summary": summary,
            "title": f"mpsearch: {result.task} on {', '.join(names)}", "front": [result.trial(n) for n in front],
            "result": result, "compare": compare}


def _best_of(compare: dict, result: SearchResult, name: str) -> int | None:
    """A compare target's best: compare.json's, else chosen again as compare.py chooses it."""
    pt = compare["per_target"][name]
    if "best" in pt:
        return pt["best"]
    from mpsearch.results.compare import Comparison

    per = {t: {**v, "trials": {int(k): x for k, x in v["trials"].items()}} for t, v in compare["per_target"].items()}
    return Comparison(result, compare["targets"], per).view(name).best


# -- figures ---------------------------------------------------------------------------------------

def _go():
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError:  # a dependency of mpsearch; only a broken install lacks it
        raise MissingDependencyError("the report needs plotly: pip install plotly") from None
    return go, make_subplots


def _layout(fig, title: str, height: int, **kw) -> None:
    fig.update_layout(title={"text": _e(title), "x": 0.01, "xanchor": "left"}, height=height, template="plotly_white",
                      margin={"l": 70, "r": 30, "t": 80, "b": 60}, font={"size": 13},
                      hoverlabel={"align": "left"}, **kw)


def _hover(p: dict, target: str, metric_name: str) -> str:
    sp = "" if p["speedup"] is None else f"{p['speedup']:.2f}x over FP32"
    tags = " (best)" if p["best"] else " (Pareto front)" if p["front"] else ""
    return (f"<b>trial {p['trial']}{tags}</b><br>{_e(target)}: {p['latency_ms']:.4g} ms {sp}<br>"
            f"{_e(metric_name)} {p['metric']:.4f}<br>{_e(p['config'])}")


def _log_axis(values: Sequence[float]) -> bool:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    return bool(vals) and max(vals) / min(vals) > 4


def pareto_figure(data: dict):
    go, make_subplots = _go()
    targets, name = data["targets"], data["metric_name"]
    fig = make_subplots(rows=1, cols=len(targets), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[_e(t["name"]) for t in targets])
    for col, t in enumerate(targets, start=1):
        pts, show = t["points"], col == 1
        on = [p for p in pts if p["front"]]
        on.sort(key=lambda p: p["latency_ms"])
        off = [p for p in pts if not p["front"]]
        for key, label, symbol, color in (("fp32", "FP32", "x", "#222222"), ("int8", "uniform int8", "diamond", COLORS[4])):
            r = t[key]
            if r is None or r["latency_ms"] is None or r["metric"] is None:
                continue
            sp = speedup(t["fp32"]["latency_ms"], r["latency_ms"])
            fig.add_trace(go.Scatter(
                x=[r["latency_ms"]], y=[r["metric"]], mode="markers", name=label, legendgroup=key, showlegend=show,
                legendrank=1004 if key == "fp32" else 1005,
                marker={"color": color, "size": 13, "symbol": symbol, "line": {"color": "white", "width": 1}},
                hovertemplate=(f"<b>{label}</b><br>{_e(t['name'])}: {r['latency_ms']:.4g} ms"
                               + ("" if sp is None else f" {sp:.2f}x over FP32")
                               + f"<br>{_e(name)} {r['metric']:.4f}<extra></extra>")), 1, col)
        hover = "%{text}<extra></extra>"
        fig.add_trace(go.Scatter(x=[p["latency_ms"] for p in off], y=[p["metric"] for p in off], mode="markers",
                                 name="scored trial", legendgroup="trial", showlegend=show, legendrank=1001,
                                 marker={"color": "#9aa5b1", "size": 7, "opacity": 0.6},
                                 text=[_hover(p, t["name"], name) for p in off], hovertemplate=hover), 1, col)
        fig.add_trace(go.Scatter(x=[p["latency_ms"] for p in on], y=[p["metric"] for p in on], mode="lines+markers",
                                 name="Pareto front", legendgroup="front", showlegend=show, legendrank=1002,
                                 line={"color": COLORS[0], "width": 2, "shape": "hv"},
                                 marker={"color": COLORS[0], "size": 9},
                                 text=[_hover(p, t["name"], name) for p in on], hovertemplate=hover), 1, col)
        best = [p for p in pts if p["best"]]
        fig.add_trace(go.Scatter(x=[p["latency_ms"] for p in best], y=[p["metric"] for p in best], mode="markers",
                                 name="best (deploy this)", legendgroup="best", showlegend=show, legendrank=1003,
                                 marker={"color": COLORS[1], "size": 17, "symbol": "star",
                                         "line": {"color": "white", "width": 1}},
                                 text=[_hover(p, t["name"], name) for p in best], hovertemplate=hover), 1, col)
        xs = [p["latency_ms"] for p in pts] + [r["latency_ms"] for r in (t["fp32"], t["int8"]) if r and r["latency_ms"]]
        fig.update_xaxes(title_text="latency (ms)", type="log" if _log_axis(xs) else "linear", row=1, col=col)
    fig.update_yaxes(title_text=_e(name), row=1, col=1)
    _layout(fig, f"{data['task']}: {name} against latency, per target", 520,
            legend={"orientation": "h", "y": -0.18, "x": 0, "yanchor": "top"})
    fig.update_layout(margin={"b": 110})
    return fig


def _short(p: str) -> str:
    return SHORT.get(p, p.removeprefix("int"))


def precision_figure(data: dict):
    go, make_subplots = _go()
    front = data["front"]
    if not front:
        return None
    fqns = list(front[0].config)
    present = sorted({c.weight.value for t in front for c in t.config.values()}
                     | {c.activation.value for t in front for c in t.config.values()},
                     key=list(PRECISION_COLORS).index)
    level = {p: i for i, p in enumerate(present)}
    n = len(present)
    # a discrete colour scale: band i of n is precision i's colour
    scale = []
    for i, p in enumerate(present):
        scale += [[i / n, PRECISION_COLORS[p]], [(i + 1) / n, PRECISION_COLORS[p]]]
    rows = [f"trial {t.number} ({t.metric:.4f})" for t in front]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=["weights", "activations"])
    for r, part in ((1, "weight"), (2, "activation")):
        z = [[level[getattr(t.config[f], part).value] for f in fqns] for t in front]
        text = [[_short(getattr(t.config[f], part).value) for f in fqns] for t in front]
        hover = [[f"trial {t.number}, {_e(f)}<br>weights {t.config[f].weight.value}, "
                  f"activations {t.config[f].activation.value}" for f in fqns] for t in front]
        fig.add_trace(go.Heatmap(
            z=z, x=[_e(f) for f in fqns], y=rows, text=text, texttemplate="%{text}", customdata=hover,
            hovertemplate="%{customdata}<extra></extra>", colorscale=scale, zmin=-0.5, zmax=n - 0.5,
            xgap=1, ygap=1, showscale=r == 1,
            colorbar={"title": {"text": "precision"}, "tickvals": list(range(n)), "ticktext": present,
                      "len": 0.9, "y": 0.5}), r, 1)
    fig.update_yaxes(autorange="reversed", tickfont={"size": 12})
    fig.update_xaxes(tickangle=-60, tickfont={"size": 12}, automargin=True, row=2, col=1)
    height = max(360, 2 * 26 * len(front) + 260 + 6 * max(len(f) for f in fqns))
    _layout(fig, f"precision per layer of the {len(front)} configuration(s) on the front of {data['targets'][0]['name']} "
            "(fastest first; the number is the bit width)", height)
    return fig


def breakdown_figure(data: dict):
    go, make_subplots = _go()
    rows = [t for t in data["targets"] if t["breakdown"]]
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, vertical_spacing=0.12 if len(rows) > 1 else 0.1,
                        subplot_titles=[f"{_e(t['name'])}: trial {t['best']}, "
                                        f"{sum(r['latency_us'] + r['transition_us'] for r in t['breakdown']) / 1e3:.4g} ms"
                                        for t in rows])
    for i, t in enumerate(rows, start=1):
        b = t["breakdown"]
        x = [f"{_e(r['fqn'])} ({_e(r['precision'])})" for r in b]
        tips = [f"<b>{_e(r['fqn'])}</b> {_e(r['precision'])}<br>compute {r['latency_us']:.4g} us "
                f"({_e(r['compute'])}, {_e(r['bound'])})"
                + (f"<br>precision conversion {r['transition_us']:.3g} us" if r["transition_us"] else "")
                for r in b]
        fig.add_trace(go.Bar(x=x, y=[r["latency_us"] for r in b], name="compute", legendgroup="compute",
                             showlegend=i == 1, marker={"color": COLORS[0]}, customdata=tips,
                             hovertemplate="%{customdata}<extra></extra>"), i, 1)
        fig.add_trace(go.Bar(x=x, y=[r["transition_us"] for r in b], name="precision conversion (Q/DQ)",
                             legendgroup="conversion", showlegend=i == 1, marker={"color": COLORS[4]},
                             customdata=tips, hovertemplate="%{customdata}<extra></extra>"), i, 1)
        fig.update_yaxes(title_text="us", row=i, col=1)
        fig.update_xaxes(tickangle=-60, tickfont={"size": 12}, automargin=True, row=i, col=1)
    n_layers = max(len(t["breakdown"]) for t in rows)
    _layout(fig, f"per-layer latency of the best configuration ({n_layers} layers)", 140 + 420 * len(rows),
            barmode="stack", legend={"orientation": "h", "y": 1.02 + 0.04 / len(rows), "x": 1, "xanchor": "right",
                                     "yanchor": "bottom"})
    return fig


def history_figure(data: dict):
    """Each scored trial's metric (top) and latency on the first target (bottom), in trial order:
    the front's trials and the best marked, the best metric and lowest latency so far, FP32's."""
    go, make_subplots = _go()
    result, name, t0 = data["result"], data["metric_name"], data["targets"][0]
    by_trial = {p["trial"]: p for p in t0["points"]}
    scored = [t for t in result.trials if t.state in ("complete", "pruned") and t.metric is not None]
    if not scored:
        return None
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[_e(name), f"latency on {_e(t0['name'])} (ms)"])
    groups = (("scored trial", "#9aa5b1", 8, "circle", lambda t: t.state == "complete" and t.number not in t0["front"]),
              ("stopped early", "#d0d4d9", 7, "circle-open", lambda t: t.state == "pruned"),
              ("on the Pareto front", COLORS[0], 9, "circle", lambda t: t.number in t0["front"] and t.number != t0["best"]),
              ("best", COLORS[1], 15, "star", lambda t: t.number == t0["best"]))
    for label, color, size, symbol, keep in groups:
        ts = [t for t in scored if keep(t)]
        text = [f"<b>trial {t.number}</b> ({t.state})<br>{_e(name)} {t.metric:.4f}<br>"
                f"{by_trial[t.number]['latency_ms'] if t.number in by_trial else t.latency_ms:.4g} ms on "
                f"{_e(t0['name'])}<br>{_e(config_summary(t))}" for t in ts]
        for row, y in ((1, [t.metric for t in ts]),
                       (2, [by_trial[t.number]["latency_ms"] if t.number in by_trial else t.latency_ms for t in ts])):
            fig.add_trace(go.Scatter(x=[t.number for t in ts], y=y, mode="markers", name=label, legendgroup=label,
                                     showlegend=row == 1 and bool(ts),
                                     marker={"color": color, "size": size, "symbol": symbol}, text=text,
                                     hovertemplate="%{text}<extra></extra>"), row, 1)
    done = [t for t in scored if t.state == "complete" and t.feasible]
    for row, pick, label in ((1, lambda t: t.metric, f"highest {name} so far"),
                             (2, lambda t: by_trial[t.number]["latency_ms"] if t.number in by_trial else None,
                              "lowest latency so far")):
        xs, ys, run = [], [], None
        for t in done:
            v = pick(t)
            if v is None or not math.isfinite(v):
                continue
            run = v if run is None else (max(run, v) if row == 1 else min(run, v))
            xs.append(t.number)
            ys.append(run)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=_e(label), line={"color": COLORS[1 if row == 1 else 4],
                                 "shape": "hv", "width": 1.5}, hoverinfo="skip"), row, 1)
    for row, v in ((1, result.reference.get("fp32_metric")), (2, t0["fp32"]["latency_ms"])):
        if v is not None:
            fig.add_hline(y=v, line={"color": "#222222", "dash": "dash", "width": 1}, row=row, col=1,
                          annotation_text=f"FP32 {v:.4g}", annotation_position="top left")
    fig.update_xaxes(title_text="trial", row=2, col=1)
    _layout(fig, f"search history: {len(scored)} scored trials in the order they ran", 620)
    return fig


def _predicted_reference(result: SearchResult, name: str) -> float | None:
    """The cost model's latency of a verification reference: FP32's (result.json's reference).
    Not int8's: verify's uniform int8 quantizes the model's input too, the search's reference
    (mpsearch.engine.setup.int8_reference) keeps it float, so their predictions differ."""
    return result.reference.get("fp32_latency_ms") if name == "fp32" else None


def verification_figure(data: dict):
    go, _ = _go()
    v = getattr(data["result"], "verification", None)
    if not v:
        return None
    labels, pred, meas = [], [], []
    for k, r in v["references"].items():
        labels.append(_e(k))
        pred.append(_predicted_reference(data["result"], k))
        meas.append(r["latency_ms"])
    for n, t in v["trials"].items():
        labels.append(f"trial {_e(n)}" + (" (best)" if t["best"] else ""))
        pred.append(t["predicted_latency_ms"])
        meas.append(t["latency_ms"])
    fig = go.Figure([
        go.Bar(x=labels, y=pred, name="predicted (cost model)", marker={"color": COLORS[0]},
               hovertemplate="%{x}: predicted %{y:.4g} ms<extra></extra>"),
        go.Bar(x=labels, y=meas, name="measured (ONNX Runtime)", marker={"color": COLORS[1]},
               hovertemplate="%{x}: measured %{y:.4g} ms<extra></extra>"),
    ])
    w = v["where"]
    fig.update_yaxes(title_text="latency (ms)")
    _layout(fig, f"measured beside predicted latency: {w['threads']} thread(s), batch {w['batch_size']}, "
            f"{w['cpu']}", 420, barmode="group")
    return fig


def figures(data: dict) -> dict[str, Any]:
    """The report's Plotly figures by name (FIGURES; a view with nothing to show is left out)."""
    made = {"pareto": pareto_figure(data), "precision_map": precision_figure(data),
            "latency_breakdown": breakdown_figure(data), "history": history_figure(data),
            "verification": verification_figure(data)}
    return {k: f for k, f in made.items() if f is not None}


# -- HTML -------------------------------------------------------------------------------------------

def _num(v: float | None, fmt: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, fmt) + suffix


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], table_id: str = "") -> str:
    """An HTML table, sortable by clicking a header (sortBy), its cells escaped."""
    head = "".join(f'<th onclick="sortBy(this)">{html.escape(h)}</th>' for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def trials_table(data: dict) -> str:
    result, name, targets = data["result"], data["metric_name"], data["targets"]
    header = ["trial", "state", name, f"{name} 95% CI", "KL to FP32"]
    for t in targets:
        suffix = f" ({t['name']})" if len(targets) > 1 else ""
        header += [f"latency ms{suffix}", f"vs FP32{suffix}"]
    header += ["weights KiB", "weight bits", "activation bits", "Pareto", "best", "configuration", "note"]
    rows = []
    for tr in result.trials:
        kl = tr.proxies.get("kl_to_fp32")
        row = [tr.number, tr.state, _num(tr.metric, ".4f"), ci(tr.intervals.get("metric"), ".4f"),
               "" if kl is None else f"{kl:.3g}" + (f" ({ci(tr.intervals['kl_to_fp32'], '.3g')})"
                                                    if "kl_to_fp32" in tr.intervals else "")]
        for t in targets:
            cost = t["priced"].get(tr.number)
            lat = cost["latency_ms"] if cost is not None else tr.latency_ms
            lat = lat if lat is not None and math.isfinite(lat) else None
            row += [_num(lat, ".4g"), _num(speedup(t["fp32"]["latency_ms"], lat), ".2f", "x")]
        on = [t["name"] for t in targets if tr.number in t["front"]]
        best = [t["name"] for t in targets if tr.number == t["best"]]
        row += [f"{tr.weight_bytes / 1024:.1f}", f"{tr.mean_weight_bits:.2f}", f"{tr.mean_activation_bits:.2f}",
                ("yes" if len(targets) == 1 else ", ".join(on)) if on else "",
                ("yes" if len(targets) == 1 else ", ".join(best)) if best else "",
                config_summary(tr), tr.reason[:160]]
        rows.append(row)
    return _table(header, rows, "trials")


def budget_table(data: dict) -> str:
    compare = data["compare"]
    if not compare:
        return ""
    rows = [[t, r["budget"], _num(r["budget_ms"], ".4g"), "-" if r["trial"] is None else r["trial"],
             _num(r["metric"], ".4f"), _num(r["latency_ms"], ".4g"), _num(r["speedup_fp32"], ".2f", "x"),
             _num(r["speedup_int8"], ".2f", "x")]
            for t in compare["targets"] for r in compare["per_target"][t]["table"]]
    return ("<h2>Best within each latency budget</h2>"
            + _table(["target", "budget", "budget ms", "trial", data["metric_name"], "latency ms", "vs FP32", "vs int8"],
                     rows))


def verification_table(data: dict) -> str:
    v = getattr(data["result"], "verification", None)
    if not v:
        return ""
    w = v["where"]
    where = (f"Measured on {w['host']} ({w['cpu']}; {', '.join(w['features']) or 'no int8 dot-product features'}), "
             f"{w['threads']} thread(s), batch {w['batch_size']}, ONNX Runtime: {w['placement']}. "
             f"Measured front: {', '.join(f'trial {n}' for n in v['measured_front']) or 'none'}.")
    name = data["metric_name"]
    rows = [[k, _num(_predicted_reference(data["result"], k), ".4g"), f"{r['latency_ms']:.4g}", "",
             f"{r['measured_speedup']:.2f}x", f"{r['sim_metric']:.4f}",
             f"{r['metric']:.4f}", r["int8_kernels"]] for k, r in v["references"].items()]
    rows += [[f"trial {n}" + (" (best)" if t["best"] else ""), f"{t['predicted_latency_ms']:.4g}",
              f"{t['latency_ms']:.4g}", _num(t["predicted_speedup"], ".2f", "x"), f"{t['measured_speedup']:.2f}x",
              f"{t['predicted_metric']:.4f}", f"{t['metric']:.4f}", t["int8_kernels"]] for n, t in v["trials"].items()]
    return (f"<h2>Verified on hardware</h2><p>{html.escape(where)}</p>"
            + _table(["configuration", "predicted ms", "measured ms", "predicted vs FP32", "measured vs FP32",
                      f"simulated {name}", f"ONNX Runtime {name}", "int8 kernels"], rows))


_SCRIPT = """<script>
function sortBy(th) {
  const table = th.closest('table'), body = table.tBodies[0], i = [...th.parentNode.children].indexOf(th);
  const asc = th.dataset.asc !== '1';
  const key = r => { const v = r.cells[i].textContent; const n = parseFloat(v); return isNaN(n) ? v : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
  th.dataset.asc = asc ? '1' : '0';
}
</script>"""

_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 1.5em 2em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 13px; margin: 0.6em 0; }
td, th { border: 1px solid #d0d4d9; padding: 3px 8px; text-align: right; }
#trials td:last-child, #trials td:nth-last-child(2) { text-align: left; }
th { background: #f2f4f7; cursor: pointer; }
tbody tr:nth-child(even) { background: #fafbfc; }
.plot { width: 100%; }
</style>"""


def render(result: SearchResult, compare: dict | None, figs: dict | None = None) -> str:
    """The report as one HTML page (plotly.js inline once)."""
    import plotly.offline

    data = report_data(result, compare)
    figs = figures(data) if figs is None else figs

    def plot(key: str) -> str:
        if key not in figs:
            return "<p>Nothing to show.</p>"
        return figs[key].to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}",
                                 default_width="100%", config=PLOT_CONFIG)

    return "\n".join([
        "<!DOCTYPE html>", '<html><head><meta charset="utf-8">', f"<title>{html.escape(data['title'])}</title>",
        _STYLE, f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>', _SCRIPT, "</head><body>",
        f"<h1>{html.escape(data['title'])}</h1>", f"<p>{html.escape(data['summary'])}</p>", budget_table(data),
        "<h2>Pareto fronts</h2>", plot("pareto"),
        *([verification_table(data), plot("verification")] if "verification" in figs else []),
        "<h2>Precisions on the front</h2>", plot("precision_map"),
        "<h2>Per-layer latency of the best configuration</h2>", plot("latency_breakdown"),
        "<h2>Search history</h2>", plot("history"),
        "<h2>Trials</h2><p>Click a column's header to sort by it.</p>", trials_table(data),
        "</body></html>",
    ])


def write_report(out_dir: str | Path, png: bool = False) -> list[Path]:
    """DIR/report.html from DIR/result.json (and compare.json); with png, its figures as PNGs too
    (write_pngs). Returns the files written; the HTML is written before the PNGs are tried.
    Each file is replaced whole or not at all: a write that fails (a full disk, a read-only
    directory) raises an OSError naming the file and leaves the previous one, and no temporary
    file."""
    out_dir = Path(out_dir)
    result, compare = _load(out_dir)
    figs = figures(report_data(result, compare))
    path = out_dir / "report.html"
    atomic_write_bytes(path, render(result, compare, figs).encode("utf-8"), durable=False)
    written = [path]
    if png:
        written += write_pngs(out_dir, figs)
    return written


def draw_pngs(out_dir: str | Path, tracking: dict | None = None) -> list[Path]:
    """What `mpsearch search` and `compare` draw after their summary: report.html again with its
    figures as PNGs (write_report), the PNGs logged to the search's MLflow run (`tracking`:
    SearchResult.tracking). Without a browser for kaleido, one line on stderr and no PNGs: the
    search is done and written, a missing browser must not fail it. Returns the files written."""
    from mpsearch.results.tracking import Tracker

    out_dir = Path(out_dir)
    try:
        files = write_report(out_dir, png=True)
    except MissingDependencyError as e:
        print(f"mpsearch: PNG plots skipped: {e}; {out_dir / 'report.html'} has the same views", file=sys.stderr)
        return []
    tracker = Tracker.resume(tracking or {})
    if tracker is not None:
        tracker.log_files(files)
    return files


def write_pngs(out_dir: Path, figs: dict) -> list[Path]:
    """The figures as OUT/<name>.png, WIDTH pixels wide, in one kaleido session (it drives a
    headless Chrome or Chromium, found as kaleido finds it: BROWSER_PATH, else on PATH;
    MissingDependencyError when there is none).

    kaleido draws them into a private folder in OUT, then each replaces its PNG: a failed write
    raises an OSError naming the PNG (plotly's write_images would drop it: kaleido returns
    write errors rather than raising them there) and leaves the previous PNGs whole."""
    no_browser = MissingDependencyError(
        "no Chrome or Chromium for kaleido to draw them in (apt install chromium, or plotly_get_chrome; "
        "BROWSER_PATH names one not on PATH)")
    try:
        import kaleido
        import plotly.io as pio
        from choreographer.browsers.chromium import Chromium
        from kaleido.errors import ChromeNotFoundError
    except ImportError:
        raise MissingDependencyError("kaleido is not installed (pip install kaleido)") from None
    found = Chromium.find_browser(skip_local=False)
    if not found or not Path(found).is_file():
        raise no_browser
    paths = [out_dir / f"{k}.png" for k in figs]
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".png-{os.getpid()}-", suffix=".tmp", dir=out_dir))
    except OSError as e:
        raise type(e)(e.errno, e.strerror, str(paths[0])) from None
    drawn = {folder / p.name: p for p in paths}
    # what plotly.io.write_images gives kaleido (its defaults: a local plotly.js, MathJax, ...)
    kopts = {k: getattr(pio.defaults, k) for k in ("plotlyjs", "mathjax", "headers") if getattr(pio.defaults, k, None)}
    specs = [{"fig": fig.to_dict(), "path": tmp, "topojson": pio.defaults.topojson,
              "opts": {"format": "png", "width": WIDTH, "height": fig.layout.height, "scale": 1}}
             for tmp, fig in zip(drawn, figs.values(), strict=True)]
    try:
        try:  # kaleido returns the errors of the figures it could not write (cancelling the others is noisy)
            errors = kaleido.write_fig_from_object_sync(specs, kopts=kopts)
        except ChromeNotFoundError:
            raise no_browser from None
        for e in errors or ():
            if isinstance(e, OSError):
                raise e
        if errors:
            if isinstance(errors[0], ChromeNotFoundError):
                raise no_browser
            raise MissingDependencyError(f"kaleido could not draw them ({type(errors[0]).__name__}: {errors[0]})")
        for tmp, path in drawn.items():
            os.replace(tmp, path)
    except OSError as e:  # name the PNG, not the file in the private folder
        where = drawn.get(Path(e.filename), e.filename) if e.filename else paths[0]
        raise type(e)(e.errno, e.strerror, str(where)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return paths
