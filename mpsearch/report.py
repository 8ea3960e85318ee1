"""Plain-text views of a SearchResult (the Pareto table printed by the CLI)."""

from __future__ import annotations

from mpsearch.result import SearchResult, TrialRecord


def _row(t: TrialRecord, fp32_latency_ms: float | None, marker: str, extra: list[str]) -> list[str]:
    if fp32_latency_ms is None:  # the target cannot run FP32
        speedup = "-"
    else:
        speedup = f"{fp32_latency_ms / t.latency_ms:.2f}x" if t.latency_ms > 0 else "inf"
    cells = {
        "activation_memory": f"{t.peak_act_bytes / 1024:.1f}",
        "energy": "-" if t.energy_mj is None else f"{t.energy_mj:.4g}",
    }
    return [
        f"{t.number}{marker}",
        f"{t.metric:.4f}",
        f"{t.latency_ms:.5g}",
        speedup,
        f"{t.weight_bytes / 1024:.1f}",
        *(cells[e] for e in extra),
        f"{t.bops / 1e6:.4g}",
        f"{t.mean_weight_bits:.2f}",
        f"{t.mean_activation_bits:.1f}",
    ]


_EXTRA_HEADER = {"activation_memory": "peak_act_KiB", "energy": "energy_mJ"}


def _ms(v: float | None) -> str:
    return "n/a on this target" if v is None else f"{v:.4g} ms"


def pareto_table(result: SearchResult) -> str:
    """The Pareto front as an aligned table, fastest first; '*' marks the best trial."""
    ref = result.reference
    extra = [o for o in result.objectives if o in _EXTRA_HEADER]
    header = ["trial", ref["metric_name"], "latency_ms", "speedup", "weights_KiB",
              *(_EXTRA_HEADER[e] for e in extra), "MBOPs", "w_bits", "a_bits"]
    best = result.best
    rows = [_row(result.trial(n), ref["fp32_latency_ms"], "*" if n == best else "", extra) for n in result.pareto]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        (f"Pareto front: {result.task} on {result.target} "
        f"({len(result.pareto)} of {len(result.trials)} trials; "
        f"FP32 {ref['metric_name']} {ref['fp32_metric']:.4f}, latency {_ms(ref['fp32_latency_ms'])}, "
        f"weights {ref['fp32_weight_bytes'] / 1024:.1f} KiB)"),
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if not rows:
        lines.append("(no feasible trial completed)")
    st = result.settings
    budgets = [f"{st[k]:g} {unit}" for k, unit in (("latency_budget_ms", "ms"), ("size_budget_mb", "MB of weights"),
                                                   ("memory_budget_mb", "MB of memory")) if st.get(k) is not None]
    if best is not None:
        b = result.trial(best)
        under = f" under {', '.join(budgets)}" if budgets else ""
        lines.append(f"best{under}: trial {best}, {ref['metric_name']} {b.metric:.4f}, {b.latency_ms:.4g} ms")
    counts = {}
    for t in result.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    lines.append("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def cost_table(cost_model, candidate) -> str:
    """Per-layer costs of a candidate on a target (latency, bound, bytes) and the totals."""
    parts = cost_model.breakdown(candidate)
    cost = cost_model.price(candidate)
    specs = {x.fqn: x for x in cost_model.layers}
    header = ["layer", "op", "weight/act", "compute", "bound", "latency_us", "convert_us", "weight_B", "act_B"]
    rows = []
    for c in parts:
        rows.append([
            c.fqn, specs[c.fqn].op, f"{c.choice.weight}/{c.choice.activation}",
            c.compute or "UNSUPPORTED", c.bound if c.supported else "-",
            f"{c.latency_s * 1e6:.4g}", f"{c.transition_s * 1e6:.3g}" if c.transition_s else "",
            f"{c.weight_bytes:,}", f"{c.act_bytes * cost_model.batch_size:,}",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [f"{cost_model.profile.name}, batch size {cost_model.batch_size}"
             + (" (measured per-layer table)" if cost_model.measured else "")]
    lines.append("  ".join(h.ljust(w) if i < 5 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    lines.append(
        f"total: latency {cost.latency_ms:.4g} ms (of which {cost.transitions} conversions "
        f"{cost.transition_s * 1e3:.3g} ms), weights {cost.weight_bytes:,} B, peak activations "
        f"{cost.peak_act_bytes:,} B, {cost.bops / 1e9:.4g} GBOPs"
        + (f", energy {cost.energy_j * 1e3:.4g} mJ" if cost.energy_j is not None else "")
    )
    if not cost.feasible:
        lines.append(f"infeasible: {cost.reason}")
    return "\n".join(lines)
