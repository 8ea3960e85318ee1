"""Evaluator benchmark: cache build time, per-candidate cost relative to an FP32 forward,
metric per uniform precision and quantizer method, and simulated-vs-real int8 agreement.

    .venv/bin/python benchmarks/evaluator.py [--quick] [--json PATH] [--tasks digits,mobilenet_v2]

--quick: 3 repeats instead of 7, and mobilenet_v2 scored on the first half of its evaluation batches
(128 crops) instead of all 4 (256 crops). Under 3 minutes on a 2-core machine.

JSON keys (one entry per task under "tasks"):
  cache_build_s      one-time work of the default evaluator: calibration + FP32 reference outputs
  fp32_forward_s     median time of a plain FP32 forward over the evaluation batches
  candidate_eval_s   median time of one candidate evaluation (uniform W8A8, cache warm, not memoized)
  eval_over_fp32     median over repeats of candidate_eval_s / fp32_forward_s, each pair timed
                     back to back in this process (target <= 1.25)
  fp32_metric        the task metric of the FP32 model
  metric_name        what the metric is
  metrics            {config: {method: metric}} for configs W8A8, W6A8, W4A8, W4A4 and methods
                     minmax, percentile, mse, mse+bias_correction (see METHODS)
  kl                 the same table for KL divergence to FP32 (classifiers)
  faithfulness       simulated W8A8 vs ONNX Runtime int8 (QDQ): see mpsearch.faithfulness
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from hw_models import Candidate, Precision
from mpsearch.analysis import analyze
from mpsearch.evaluator import Evaluator, QuantSettings
from mpsearch.tasks import load_task

P = Precision
CONFIGS = {"W8A8": (P.INT8, P.INT8), "W6A8": (P.INT6, P.INT8), "W4A8": (P.INT4, P.INT8), "W4A4": (P.INT4, P.INT4)}
METHODS = {
    "minmax": QuantSettings(weight_clipping="minmax", act_range="minmax", bias_correction="off"),
    "percentile": QuantSettings(weight_clipping="minmax", act_range="percentile", bias_correction="off"),
    "mse": QuantSettings(weight_clipping="mse", act_range="mse", bias_correction="off"),
    "mse+bias_correction": QuantSettings(weight_clipping="mse", act_range="mse", bias_correction="on"),
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
        task.eval_batches = task.eval_batches[: len(task.eval_batches) // 2]
    analysis = analyze(task.model, task.example_input)
    repeats = 3 if quick else 7
    out: dict = {"metric_name": task.metric_name}

    log(f"[{name}] building the default evaluator")
    t0 = time.perf_counter()
    ev = Evaluator(task, analysis)
    out["cache_build_s"] = time.perf_counter() - t0
    out["fp32_metric"] = task.evaluate(task.model)

    w8a8 = Candidate.uniform(analysis.fqns, P.INT8, P.INT8)
    ev.score(w8a8)  # warm the weight and activation caches
    fp32_times, cand_times, ratios = [], [], []
    with torch.no_grad():
        for i in range(repeats):
            log(f"[{name}] timing repeat {i + 1}/{repeats}")
            f = timed(lambda: task.outputs(task.model))
            c = timed(lambda: ev.outputs(w8a8))  # the work of an evaluation, bypassing the memo
            fp32_times.append(f)
            cand_times.append(c)
            ratios.append(c / f)
    out["fp32_forward_s"] = statistics.median(fp32_times)
    out["candidate_eval_s"] = statistics.median(cand_times)
    out["eval_over_fp32"] = statistics.median(ratios)
    ev.close()

    out["metrics"], out["kl"] = {}, {}
    for method, settings in METHODS.items():
        log(f"[{name}] method {method}")
        ev = Evaluator(task, analysis, settings)
        for cfg, (w, a) in CONFIGS.items():
            score = ev.score(Candidate.uniform(analysis.fqns, w, a))
            out["metrics"].setdefault(cfg, {})[method] = score.metric
            if "kl_to_fp32" in score.proxies:
                out["kl"].setdefault(cfg, {})[method] = score.proxies["kl_to_fp32"]
        ev.close()

    try:
        from mpsearch.faithfulness import compare_int8

        log(f"[{name}] simulated vs ONNX Runtime int8")
        ev = Evaluator(task, analysis)
        out["faithfulness"] = compare_int8(task, analysis, ev).to_dict()
        ev.close()
    except ImportError as e:
        out["faithfulness"] = {"skipped": str(e)}
    return out


def print_task(name: str, r: dict) -> None:
    print(f"\n== {name} ({r['metric_name']}; FP32 {r['fp32_metric']:.4f})")
    print(f"cache build (calibration + FP32 reference): {r['cache_build_s']:.2f} s")
    print(f"FP32 forward over the eval batches: {r['fp32_forward_s']:.3f} s; one candidate (W8A8): "
          f"{r['candidate_eval_s']:.3f} s; ratio {r['eval_over_fp32']:.2f} (target <= 1.25)")
    methods = list(METHODS)
    print(f"{'config':8s}" + "".join(f"{m:>22s}" for m in methods))
    for cfg, row in r["metrics"].items():
        print(f"{cfg:8s}" + "".join(f"{row[m]:22.4f}" for m in methods))
    if r["kl"]:
        print("KL divergence to FP32:")
        for cfg, row in r["kl"].items():
            print(f"{cfg:8s}" + "".join(f"{row[m]:22.4f}" for m in methods))
    f = r.get("faithfulness", {})
    if f and "skipped" not in f:
        print("simulated W8A8 vs ONNX Runtime int8: " + ", ".join(f"{k}={v}" for k, v in f.items()))
    elif f:
        print(f"simulated vs real int8: skipped ({f['skipped']})")


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
