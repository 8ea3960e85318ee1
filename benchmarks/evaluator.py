"""Evaluator benchmark: cache build time, per-candidate cost relative to an FP32 forward,
metric per uniform precision and quantizer method, and simulated-vs-real int8 agreement.

    .venv/bin/python benchmarks/evaluator.py [--quick] [--json PATH] [--tasks digits,mobilenet_v2]

--quick: 3 repeats instead of 7; mobilenet_v2 calibrated on half of its calibration batches (64
crops instead of 128) and scored on a quarter of its evaluation batches (64 crops instead of 256),
without the AdaRound column (its one-time cost is ~2 minutes here); 8 early-stopping trials
instead of 40. Under 3 minutes on a 2-core machine.

JSON keys (one entry per task under "tasks"):
  cache_build_s      one-time work of the default evaluator: calibration + FP32 reference outputs
  fp32_forward_s     median time of a plain FP32 forward of the task's model over the evaluation
                     batches (channels-last for conv models, the faster layout here)
  candidate_eval_s   median time of one candidate evaluation (uniform W8A8, cache warm, not memoized)
  eval_over_fp32     median over repeats of candidate_eval_s / fp32_forward_s, each pair timed
                     back to back in this process (target <= 1.25)
  folded_fp32_s      median time of the evaluator's FP32 forward (batch norms folded, no quantizer)
  eval_over_folded   median of candidate_eval_s / folded_fp32_s: the cost of the fake quantization
                     alone
  n_folded           batch norms folded into convolutions
  fp32_metric        the task metric of the FP32 model
  metric_name        what the metric is
  metrics            {config: {method: metric}} for configs W8A8, W6A8, W4A8, W4A4 and methods
                     minmax, percentile, mse, mse+bias_correction, mse+bc+adaround (see METHODS)
  skipped_in_quick   methods left out of this task's tables by --quick
  method_build_s     {method: seconds} to build that method's evaluator and quantize the four
                     configs' weights (AdaRound's one-time cost shows here)
  kl                 the same table for KL divergence to FP32 (classifiers)
  faithfulness       simulated W8A8 vs ONNX Runtime int8 (QDQ): see mpsearch.deploy.faithfulness
  early_stop         a random search with multi-fidelity scoring (--early-stop), then every pruned
                     candidate scored in full to check the stop: trials, pruned, batches_scored
                     and batches_full (what scoring every candidate in full runs), batch_share
                     (= batches_scored / batches_full), wrongly_pruned (pruned candidates whose
                     full metric would have put them on the Pareto front; should be 0),
                     seconds_per_trial
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch

import mpsearch
from hw_models import Candidate, Precision
from mpsearch.cache import cache_dir
from mpsearch.results.records import pareto_front
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.tasks import load_task

P = Precision
CONFIGS = {"W8A8": (P.INT8, P.INT8), "W6A8": (P.INT6, P.INT8), "W4A8": (P.INT4, P.INT8), "W4A4": (P.INT4, P.INT4)}
METHODS = {
    "minmax": QuantSettings(weight_clipping="minmax", act_range="minmax", bias_correction="off"),
    "percentile": QuantSettings(weight_clipping="minmax", act_range="percentile", bias_correction="off"),
    "mse": QuantSettings(weight_clipping="mse", act_range="mse", bias_correction="off"),
    "mse+bias_correction": QuantSettings(weight_clipping="mse", act_range="mse", bias_correction="on"),
    # learned rounding applies to weights of 4 bits and fewer: W8A8 / W6A8 as the column before
    "mse+bc+adaround": QuantSettings(weight_clipping="mse", act_range="mse", bias_correction="on",
                                     weight_rounding="adaround"),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_task(name: str, quick: bool) -> dict:
    task = load_task(name)
    if quick and name == "mobilenet_v2":
        task.calib_batches = task.calib_batches[: len(task.calib_batches) // 2]
        task.eval_batches = task.eval_batches[: len(task.eval_batches) // 4]
    analysis = analyze(task.model, task.example_input)
    repeats = 3 if quick else 7
    out: dict = {"metric_name": task.metric_name}

    log(f"[{name}] building the default evaluator")
    t0 = time.perf_counter()
    ev = Evaluator(task, analysis)
    out["cache_build_s"] = time.perf_counter() - t0
    out["fp32_metric"] = task.evaluate(task.model)

    out["n_folded"] = len(ev.folded)
    if any(isinstance(m, torch.nn.Conv2d) for m in task.model.modules()):
        task.model.to(memory_format=torch.channels_last)  # the fastest plain FP32 forward here
    w8a8 = Candidate.uniform(analysis.fqns, P.INT8, P.INT8)
    fp32 = Candidate.uniform(analysis.fqns, P.FP32, P.FP32)
    ev.score(w8a8)  # warm the weight and activation caches
    times: dict[str, list[float]] = {"fp32": [], "cand": [], "folded": []}
    with torch.no_grad():
        for i in range(repeats):
            log(f"[{name}] timing repeat {i + 1}/{repeats}")
            times["fp32"].append(timed(lambda: task.outputs(task.model)))
            times["cand"].append(timed(lambda: ev.outputs(w8a8)))  # an evaluation, bypassing the memo
            times["folded"].append(timed(lambda: ev.outputs(fp32)))
    out["fp32_forward_s"] = statistics.median(times["fp32"])
    out["candidate_eval_s"] = statistics.median(times["cand"])
    out["folded_fp32_s"] = statistics.median(times["folded"])
    out["eval_over_fp32"] = statistics.median(c / f for c, f in zip(times["cand"], times["fp32"]))
    out["eval_over_folded"] = statistics.median(c / f for c, f in zip(times["cand"], times["folded"]))
    ev.close()

    out["metrics"], out["kl"] = {}, {}
    for method, settings in METHODS.items():
        if quick and name in QUICK_SKIP.get(method, ()):
            out.setdefault("skipped_in_quick", []).append(method)
            continue
        log(f"[{name}] method {method}")
        t0 = time.perf_counter()
        ev = Evaluator(task, analysis, settings)
        ev.precompute_weights(sorted({w for w, _ in CONFIGS.values()}, key=lambda p: p.bits))
        out.setdefault("method_build_s", {})[method] = time.perf_counter() - t0
        for cfg, (w, a) in CONFIGS.items():
            score = ev.score(Candidate.uniform(analysis.fqns, w, a))
            out["metrics"].setdefault(cfg, {})[method] = score.metric
            if "kl_to_fp32" in score.proxies:
                out["kl"].setdefault(cfg, {})[method] = score.proxies["kl_to_fp32"]
        ev.close()

    try:
        from mpsearch.deploy.faithfulness import compare_int8

        log(f"[{name}] simulated vs ONNX Runtime int8")
        ev = Evaluator(task, analysis)
        out["faithfulness"] = compare_int8(task, analysis, ev).to_dict()
        ev.close()
    except ImportError as e:
        out["faithfulness"] = {"skipped": str(e)}
    out["early_stop"] = bench_early_stop(task, analysis, n_trials=EARLY_STOP_TRIALS[quick])
    return out


EARLY_STOP_TRIALS = {True: 8, False: 40}
# --quick leaves out AdaRound on mobilenet_v2 (~2 minutes of one-time work here; the full run has it)
QUICK_SKIP = {"mse+bc+adaround": ("mobilenet_v2",)}
EARLY_STOP_SPACE = {"weight_precisions": "int3,int4,int6,int8,fp32", "activation_precisions": "int8,fp32"}


def bench_early_stop(task, analysis, n_trials: int) -> dict:
    """A random search with early stopping, then the pruned candidates scored in full."""
    log(f"[{task.name}] random search of {n_trials} trials with early stopping")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = mpsearch.search(task, n_trials=n_trials, sampler="random", seed=0, out_dir=tmp, track=False,
                            progress=False, early_stop=True, **EARLY_STOP_SPACE)
        seconds = time.perf_counter() - t0
    n_batches = len(task.eval_batches)
    scored = [t for t in r.trials if t.state in ("complete", "pruned") and t.duplicate_of is None]
    pruned = [t for t in scored if t.state == "pruned"]
    log(f"[{task.name}] scoring the {len(pruned)} pruned candidates in full")
    ev = Evaluator(task, analysis, cache_dir=cache_dir("evaluator"))
    full = {t.number: ev.score(t.config).metric for t in pruned}
    ev.close()
    front = set(r.pareto)
    for t in pruned:  # the front had the pruned trials been scored in full
        t.metric, t.state = full[t.number], "complete"
    wrongly = len(set(pareto_front(r.trials)) - front)
    return {
        "trials": len(r.trials),
        "scored": len(scored),
        "pruned": len(pruned),
        "batches_scored": round(sum(t.fidelity * n_batches for t in scored)),
        "batches_full": len(scored) * n_batches,
        "batch_share": sum(t.fidelity for t in scored) / max(1, len(scored)),
        "wrongly_pruned": wrongly,
        "seconds_per_trial": seconds / n_trials,
        "space": EARLY_STOP_SPACE,
    }


def print_task(name: str, r: dict) -> None:
    print(f"\n== {name} ({r['metric_name']}; FP32 {r['fp32_metric']:.4f})")
    print(f"cache build (calibration + FP32 reference): {r['cache_build_s']:.2f} s")
    print(f"FP32 forward over the eval batches: {r['fp32_forward_s']:.3f} s; one candidate (W8A8): "
          f"{r['candidate_eval_s']:.3f} s; ratio {r['eval_over_fp32']:.2f} (target <= 1.25)")
    methods = [m for m in METHODS if m not in r.get("skipped_in_quick", [])]
    print(f"{'config':8s}" + "".join(f"{m:>22s}" for m in methods))
    for cfg, row in r["metrics"].items():
        print(f"{cfg:8s}" + "".join(f"{row[m]:22.4f}" for m in methods))
    print(f"{'build s':8s}" + "".join(f"{r['method_build_s'][m]:22.1f}" for m in methods))
    if r["kl"]:
        print("KL divergence to FP32:")
        for cfg, row in r["kl"].items():
            print(f"{cfg:8s}" + "".join(f"{row[m]:22.4f}" for m in methods))
    print(f"evaluator FP32 forward (batch norms folded: {r['n_folded']}): {r['folded_fp32_s']:.3f} s; "
          f"candidate / folded FP32 {r['eval_over_folded']:.2f}")
    f = r.get("faithfulness", {})
    if f and "skipped" not in f:
        print("simulated W8A8 vs ONNX Runtime int8: " + ", ".join(f"{k}={v}" for k, v in f.items()))
    elif f:
        print(f"simulated vs real int8: skipped ({f['skipped']})")
    e = r["early_stop"]
    print(f"early stopping (random search, {e['trials']} trials): {e['pruned']} of {e['scored']} scored "
          f"candidates pruned; {e['batches_scored']} of {e['batches_full']} evaluation batches run "
          f"({e['batch_share']:.0%}); wrongly pruned: {e['wrongly_pruned']}; {e['seconds_per_trial']:.2f} s/trial")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (< 3 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--tasks", default="digits,mobilenet_v2")
    args = ap.parse_args()
    results = {"quick": args.quick, "torch_threads": torch.get_num_threads(), "tasks": {}}
    for name in args.tasks.split(","):
        results["tasks"][name] = bench_task(name, args.quick)
        print_task(name, results["tasks"][name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
