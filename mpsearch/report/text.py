"""Plain-text views: a SearchResult's Pareto table (rich tables), its summary and next steps, the
built-in targets. The command line prints these; the API returns them as text."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mpsearch.results.compare import Comparison
from mpsearch.results.records import SearchResult, TrialRecord
from mpsearch.results.selection import COST_TIE, RANKED_BY


def vs_fp32(latency_ms: float | None, fp32_latency_ms: float | None) -> str:
    """The speed-up over FP32 as "1.13x" ("-": unknown, the target cannot run FP32)."""
    if fp32_latency_ms is None or latency_ms is None:
        return "-"
    return f"{fp32_latency_ms / latency_ms:.2f}x" if latency_ms > 0 else "inf"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 0) -> list[str]:
    """An aligned plain-text table (rich, no colours, no borders): the header line, then a line a
    row; the first `left` columns are left-aligned, the others right-aligned (numbers)."""
    table = Table(box=None, pad_edge=False, header_style="", padding=(0, 1))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < left else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    console = Console(file=io.StringIO(), width=100_000, color_system=None, force_terminal=False,
                      emoji=False, highlight=False)
    console.print(table, markup=False)
    lines = [ln.rstrip() for ln in console.file.getvalue().splitlines()]
    return [ln for ln in lines if ln.strip()]


def _row(t: TrialRecord, fp32_latency_ms: float | None, marker: str, extra: list[str]) -> list[str]:
    cells = {
        "activation_memory": f"{t.peak_act_bytes / 1024:.1f}",
        "energy": "-" if t.energy_mj is None else f"{t.energy_mj:.4g}",
    }
    return [
        f"{t.number}{marker}",
        f"{t.metric:.4f}",
        ci(t.intervals.get("metric"), ".3f"),
        f"{t.latency_ms:.5g}",
        vs_fp32(t.latency_ms, fp32_latency_ms),
        f"{t.weight_bytes / 1024:.1f}",
        *(cells[e] for e in extra),
        f"{t.bops / 1e6:.4g}",
        f"{t.mean_weight_bits:.2f}",
        f"{t.mean_activation_bits:.1f}",
    ]


_EXTRA_HEADER = {"activation_memory": "peak_act_KiB", "energy": "energy_mJ"}


def ci(interval, fmt: str = ".4g") -> str:
    """A 95% confidence interval as "low-high" ("-" when there is none)."""
    return "-" if not interval else f"{interval[0]:{fmt}}-{interval[1]:{fmt}}"


def _ms(v: float | None) -> str:
    return "n/a on this target" if v is None else f"{v:.4g} ms"


def pareto_table(result: SearchResult) -> str:
    """The Pareto front as an aligned table, fastest first ('*' marks the best trial), then how the
    best trial was chosen (best_lines) and the trial counts."""
    ref = result.reference
    extra = [o for o in result.objectives if o in _EXTRA_HEADER]
    header = ["trial", ref["metric_name"], "ci95", "latency_ms", "vs_fp32", "weights_KiB",
              *(_EXTRA_HEADER[e] for e in extra), "MBOPs", "w_bits", "a_bits"]
    best = result.best
    rows = [_row(result.trial(n), ref["fp32_latency_ms"], "*" if n == best else "", extra) for n in result.pareto]
    lines = [
        (f"Pareto front: {result.task} on {result.target} "
        f"({len(result.pareto)} of {len(result.trials)} trials; "
        f"FP32 {ref['metric_name']} {ref['fp32_metric']:.4f}, latency {_ms(ref['fp32_latency_ms'])}, "
        f"weights {ref['fp32_weight_bytes'] / 1024:.1f} KiB)"),
        *text_table(header, rows),
    ]
    if not rows:
        lines.append("(no feasible trial completed)")
    lines += best_lines(result)
    counts = {}
    for t in result.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    lines.append("trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)


def best_lines(result: SearchResult) -> list[str]:
    """The best trial (mpsearch.results.selection) and how it was chosen, in words: its drop budget, its
    speed-up over FP32, and plainly when it is slower than FP32, when no configuration beats FP32
    latency, and when no trial is within the drop budget."""
    ref, st, sel = result.reference, result.settings, result.selection
    name, fp32_ms = ref["metric_name"], ref.get("fp32_latency_ms")
    given = st.get("budgets_given") or {}  # a relative budget as typed ("75%int8") beside its number
    budgets = [f"{st[k]:.6g} {unit}" + (f" ({given[kind]})" if kind in given else "")
               for kind, k, unit in (("latency", "latency_budget_ms", "ms"), ("size", "size_budget_mb", "MB of weights"),
                                     ("memory", "memory_budget_mb", "MB of memory")) if st.get(k) is not None]
    under = f" under {', '.join(budgets)}" if budgets else ""
    if sel.trial is None:
        return [f"best: none (no complete trial{under})"]
    b = result.trial(sel.trial)
    speed = vs_fp32(b.latency_ms, fp32_ms)
    slower = fp32_ms is not None and b.latency_ms > fp32_ms
    lines = [f"best{under}: trial {b.number}, {name} {b.metric:.4f}, {b.latency_ms:.4g} ms"
             + ("" if fp32_ms is None else f" ({speed} FP32{': SLOWER than FP32' if slower else ''})")
             + f", weights {b.weight_bytes / 1024:.1f} KiB"]
    if b.intervals:  # what the evaluation set can resolve (mpsearch.metrics)
        kl = b.proxies.get("kl_to_fp32")
        parts = [f"{name} {ci(b.intervals['metric'], '.4f')}"] if "metric" in b.intervals else []
        if kl is not None and "kl_to_fp32" in b.intervals:
            parts.append(f"KL to FP32 {kl:.3g} ({ci(b.intervals['kl_to_fp32'], '.3g')})")
        lines.append(f"  95% confidence: {', '.join(parts)}")
    if sel.within_drop is None:  # a result written before drop budgets
        lines.append(f"  chosen: the highest {name}")
    elif sel.mode == "most_accurate":
        lines.append(f"  chosen: the most accurate within the budgets; {name}s within {sel.max_drop:.4g} of the highest "
                     f"({sel.source.removeprefix('default: ')}) told apart by the lowest KL to FP32 (else the highest "
                     f"SQNR), then the {RANKED_BY.get(sel.objective, 'cheapest ' + str(sel.objective))}")
        if not sel.within_drop:
            lines.append(f"  note: its {name} is below FP32 {ref['fp32_metric']:.4f} - {sel.max_drop:.4g}: the budgets "
                         "cost more than the evaluation set's noise")
    else:
        limit = (f"{name} >= {sel.min_metric:.4f} (FP32 {ref['fp32_metric']:.4f} - {sel.max_drop:.4g}; "
                 f"{sel.source})")
        if sel.within_drop:
            ranked = RANKED_BY.get(sel.objective, sel.objective)
            lines.append(f"  chosen: {ranked} among the complete trials with {limit}; within {COST_TIE:.0%} of the "
                         f"{ranked}, the higher {name}, then the lower KL to FP32 (else the higher SQNR)")
        else:
            lines.append(f"  no trial has {limit}: best falls back to the highest {name}")
    if fp32_ms is not None and (sel.fastest_speedup_fp32 is None or sel.fastest_speedup_fp32 <= 1):
        fastest = "" if sel.fastest_speedup_fp32 is None else \
            f"; the fastest complete trial runs at {sel.fastest_speedup_fp32:.2f}x FP32"
        lines.append(f"no configuration found beats FP32 latency ({fp32_ms:.4g} ms on {result.target}){fastest}")
    elif slower:
        why = (f": every configuration faster than FP32 is below {name} {sel.min_metric:.4f}"
               if sel.within_drop and sel.objective == "latency" else "")
        lines.append(f"note: trial {b.number} is slower than FP32 ({speed}){why}")
    return lines


def layer_cost_text(cost_model, candidate) -> str:
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
    lines = [f"{cost_model.profile.name}, batch size {cost_model.batch_size}"
             + (" (measured per-layer table)" if cost_model.measured else "")]
    lines += text_table(header, rows, left=5)
    lines.append(
        f"total: latency {cost.latency_ms:.4g} ms (of which {cost.transitions} "
        f"conversion{'s' if cost.transitions != 1 else ''} {cost.transition_s * 1e3:.3g} ms"
        + (", where the deployed graph has them" if cost_model.boundaries(candidate) is not None else "")
        + f"), weights {cost.weight_bytes:,} B, peak activations "
        f"{cost.peak_act_bytes:,} B, {cost.bops / 1e9:.4g} GBOPs"
        + (f", energy {cost.energy_j * 1e3:.4g} mJ" if cost.energy_j is not None else "")
    )
    if not cost.feasible:
        lines.append(f"infeasible: {cost.reason}")
    return "\n".join(lines)


def targets_text() -> str:
    """The built-in targets (`mpsearch targets`): precisions, native pairs, peaks, memory."""
    from hw_models import list_profiles

    lines = []
    for prof in list_profiles():
        w = ",".join(p.value for p in prof.weight_precisions)
        a = ",".join(p.value for p in prof.activation_precisions)
        native = sorted({f"{r.weight}/{r.activation}" for r in prof.rules if r.native})
        peaks = ", ".join(f"{k} {rate(v)}" for k, v in sorted(prof.peak_macs_per_s.items(), key=lambda kv: -kv[1]))
        lines.append(f"{prof.name:12s} {prof.kind:5s} {prof.description}")
        lines.append(f"{'':12s} weights {w}; activations {a}")
        n_all = len(prof.weight_precisions) * len(prof.activation_precisions)
        shown = f"every listed weight x activation ({len(native)})" if len(native) == n_all else ", ".join(native)
        lines.append(f"{'':12s} native pairs {shown}")
        lines.append(f"{'':12s} peak MAC/s {peaks}")
        mem = [f"memory {prof.mem_bw_bytes_per_s / 1e9:.4g} GB/s", f"overhead {prof.layer_overhead_s * 1e6:.3g} us/layer"]
        if prof.weight_capacity_bytes:
            mem.append(f"weights must fit {prof.weight_capacity_bytes // 1024} KiB")
        if prof.act_capacity_bytes:
            mem.append(f"activations must fit {prof.act_capacity_bytes // 1024} KiB")
        if prof.energy_pj_per_mac:
            mem.append("energy figures")
        lines.append(f"{'':12s} {'; '.join(mem)}\n")
    lines.append("A profile file works wherever a target name does: --target my-cpu.toml (see mpsearch calibrate).")
    return "\n".join(lines)


def rate(v: float) -> str:
    """A rate with a T, G or M prefix: 1.5G."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.4g}{unit}"
    return f"{v:.4g}"


def trial_rate(n: int, seconds: float) -> str:
    """Trials per second, or seconds per trial when a trial takes over a second (n > 0)."""
    if seconds / n > 1:
        return f"{seconds / n:.1f} s a trial"
    return f"{n / seconds:.1f} a second"


def summary_text(result: SearchResult, with_next_steps: bool = True) -> str:
    """What a finished search prints: its Pareto table, hypervolume and times, where its results
    went (result.json, the study, the report, MLflow) and, with_next_steps, what to do next."""
    lines = [pareto_table(result)]
    out = Path(result.settings["out_dir"])
    hv, timing = result.hypervolume, result.timing
    if hv is not None:
        lines.append(f"hypervolume {hv['value']:.6g} (reference point in result.json); time in sampler "
              f"{timing['sampler_s']:.1f} s, pricing {timing['pricing_s']:.2f} s, scoring {timing['scoring_s']:.1f} s"
              + "".join(f", {k.removesuffix('_s')} {v:.1f} s" for k, v in timing.items()
                        if k not in ("sampler_s", "pricing_s", "scoring_s")))
    ran, loop = result.settings.get("resumed_trials", 0), result.settings.get("search_s")
    n = len(result.trials) - ran
    if loop and n:
        lines.append(f"{n} trial{'s' if n != 1 else ''} in {loop:.1f} s ({trial_rate(n, loop)}"
              + (f", {result.settings['workers']} Ray workers" if result.settings.get("backend") == "ray" else "") + ")")
    lines.append(f"\nresults: {out / 'result.json'} (Optuna study {result.settings['study_name']!r} in "
          f"{result.settings['storage']}); report: {out / 'report.html'}")
    tracked = tracking_line(result.tracking)
    if tracked:
        lines.append(tracked)
    if with_next_steps:
        lines.append(next_steps(result))
    return "\n".join(lines)


def tracking_line(tracking: dict) -> str | None:
    """Where the MLflow runs went, or that tracking went off and why (the store failed:
    mpsearch.results.tracking; result.json has everything); None when the search was not tracked."""
    if tracking.get("run_id"):
        return f"MLflow: {tracking['mlflow_uri']} experiment {tracking['experiment']!r}, run {tracking['run_id']}"
    if tracking.get("off"):
        incomplete = tracking.get("incomplete_run_id")
        return (f"MLflow: tracking off ({tracking['mlflow_uri']} {tracking['off']})"
                + (f"; run {incomplete} is incomplete" if incomplete else "") + "; everything is in result.json")
    return None


def next_steps(result, trial: int | None = None, what: str = "") -> str:
    """What to do with a finished search: export its best configuration (or `trial`, `what`), open
    its MLflow runs and its Optuna study."""
    import shlex

    out = shlex.quote(result.settings["out_dir"])
    lines = ["\nnext steps:"]
    best = result.best if trial is None else trial
    ref = result.settings.get("task_ref") or result.task
    task = "" if ":" not in ref else f" --task {shlex.quote(ref)}"  # a task file runs only when named
    if best is not None:
        pick = "" if trial is None or trial == result.best else f" --trial {trial}"
        lines.append(f"  mpsearch export {out}{pick}{task} --out best.onnx    # {what or 'the best configuration'} "
                     f"(trial {best}) as its deployed ONNX QDQ graph; --out best.json for its precisions")
        if trial is None:
            lines.append(f"  mpsearch verify {out}{task}    # measure it and the front on this machine, as deployed "
                         "graphs")
    uri = result.tracking.get("mlflow_uri") if result.tracking.get("run_id") else None
    if uri:
        if uri.startswith(("http://", "https://")):
            lines.append(f"  open {uri}    # the MLflow runs (experiment {result.tracking['experiment']!r})")
        else:
            lines.append(f"  mlflow ui --backend-store-uri {shlex.quote(uri)}    # the MLflow runs, one per trial")
    storage = result.settings.get("storage", "")
    dashboard = storage.removeprefix("journal:///") if storage.startswith("journal:///") else storage
    if dashboard:
        secret = " with your password for ***" if "***" in dashboard else ""
        lines.append(f"  optuna-dashboard {shlex.quote(dashboard)}    # the Optuna study{secret} "
                     "(pip install optuna-dashboard)")
    return "\n".join(lines)


def compare_table(cmp: Comparison) -> str:
    """Per target and budget: the best metric within it, latency, weights and speedups."""
    name = cmp.result.reference["metric_name"]
    header = ["target", "budget", "budget_ms (vs_fp32)", "trial", name, "latency_ms", "vs_fp32", "vs_int8",
              "weights_KiB"]
    rows = []
    for target in cmp.targets:
        fp32 = cmp.per_target[target]["reference"]["fp32_latency_ms"]
        for r in cmp.per_target[target]["table"]:
            rows.append([target, r["budget"], f"{r['budget_ms']:.4g}" + (f" ({fp32 / r['budget_ms']:.2f}x)" if fp32 else ""),
                         "-" if r["trial"] is None else str(r["trial"]),
                         "-" if r["metric"] is None else f"{r['metric']:.4f}",
                         "-" if r["latency_ms"] is None else f"{r['latency_ms']:.4g}",
                         "-" if r["speedup_fp32"] is None else f"{r['speedup_fp32']:.2f}x",
                         "-" if r["speedup_int8"] is None else f"{r['speedup_int8']:.2f}x",
                         "-" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 1024:.1f}"])
    lines = [(f"{cmp.result.task}: best {name} within each latency budget, per target "
             f"({len(cmp.result.trials)} trials scored once, priced on {len(cmp.targets)} targets; "
             f"FP32 {name} {cmp.result.reference['fp32_metric']:.4f})"),
             *text_table(header, rows, left=2)]
    fronts = ", ".join(f"{t} {len(cmp.per_target[t]['pareto'])}" for t in cmp.targets)
    lines.append(f"Pareto front sizes (metric vs latency): {fronts}")
    lines.append("best per target (mpsearch.results.selection: the fastest there within the drop budget):")
    for target in cmp.targets:
        lines += [f"  {target}: {line}" if i == 0 else f"    {line.strip()}"
                  for i, line in enumerate(best_lines(cmp.view(target)))]
    return "\n".join(lines)


def space_line(space, strategy: str, study_name: str, n_previous: int, join: bool, resume: bool) -> str:
    """The line a search starts with on stderr: its space (before and after ties and pins), its
    strategy, and the study it joins or resumes."""
    return (f"mpsearch: space of 10^{space.log10_size:.2f} candidates (10^{space.unreduced_log10_size:.2f} "
            f"before ties and pins); strategy {strategy}"
            + (f"; joining study {study_name!r} ({n_previous} trials so far)" if join else
               f"; resuming after {n_previous} trials" if resume else ""))
