"""Plain-text views of a SearchResult (the Pareto table printed by the CLI)."""

from __future__ import annotations

from mpsearch.result import SearchResult, TrialRecord


def _row(t: TrialRecord, fp32_latency_ms: float, marker: str) -> list[str]:
    speedup = fp32_latency_ms / t.latency_ms if t.latency_ms > 0 else float("inf")
    return [
        f"{t.number}{marker}",
        f"{t.metric:.4f}",
        f"{t.latency_ms:.5g}",
        f"{speedup:.2f}x",
        f"{t.weight_bytes / 1024:.1f}",
        f"{t.bops / 1e6:.4g}",
        f"{t.mean_weight_bits:.2f}",
        f"{t.mean_activation_bits:.1f}",
    ]


def pareto_table(result: SearchResult) -> str:
    """The Pareto front as an aligned table, fastest first; '*' marks the best trial."""
    ref = result.reference
    header = ["trial", ref["metric_name"], "latency_ms", "speedup", "weights_KiB", "MBOPs", "w_bits", "a_bits"]
    best = result.best
    rows = [_row(result.trial(n), ref["fp32_latency_ms"], "*" if n == best else "") for n in result.pareto]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [
        (f"Pareto front: {result.task} on {result.target} "
        f"({len(result.pareto)} of {len(result.trials)} trials; "
        f"FP32 {ref['metric_name']} {ref['fp32_metric']:.4f}, latency {ref['fp32_latency_ms']:.4g} ms, "
        f"weights {ref['fp32_weight_bytes'] / 1024:.1f} KiB)"),
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    if not rows:
        lines.append("(no feasible trial completed)")
    budget = result.settings.get("latency_budget_ms")
    if best is not None:
        b = result.trial(best)
        under = f" under {budget:g} ms" if budget is not None else ""
        lines.append(f"best{under}: trial {best}, {ref['metric_name']} {b.metric:.4f}, {b.latency_ms:.4g} ms")
    counts = {}
    for t in result.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    lines.append("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
