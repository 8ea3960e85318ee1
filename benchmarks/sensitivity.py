"""Sensitivity benchmark: the one-time layer-sensitivity pass of the ILP strategies, "fisher"
(the default, second-order estimate) against "exact" (re-running the network after each layer),
timed in one process, and how well each ranks the pairs for the ILP.

    PYTHONPATH=. .venv/bin/python benchmarks/sensitivity.py [--quick] [--seeds N] [--json PATH]
        [--task mobilenet_v2] [--target x86-vnni] [--weights int8,int4,int2] [--activations int8]

Each method measures with its defaults: "exact" on DEFAULT_SAMPLES (64) evaluation samples,
"fisher" on about half of a pool of twice as many (see mpsearch.engine.sensitivity). Ranking
quality is judged against "truth": exact sensitivities on every evaluation sample (256 on
mobilenet_v2; --quick: the first 128). For a grid of weight-byte budgets (GRID budgets evenly
between the smallest allocation and all-int8), the ILP (mpsearch.engine.ilp.solve_allocation) is
solved from each method's values and from the truth, and the allocation is priced by the truth:
gap = truth-sum(method's allocation) / truth-sum(truth's allocation) - 1 (0: the same quality as
the optimum). "fisher" draws its samples and probes at random (seeded: PROBE_SEED = 0 is what a
search gets), so its quality is also given over --seeds seeds (default 5). --quick: one timing
repeat instead of 3, 2 seeds, truth on 128 samples.

JSON keys:
  cpu               this machine (mpsearch.host.cpu_info)
  task, target, pairs   the space measured: (layer, choice) pairs, the fp32 pair excluded
  evaluator_s       building the evaluator (activation ranges, FP32 outputs)
  weights_s         quantizing every layer's weight at the space's precisions, before the passes
                    (either method needs them; a cold search's pass includes this time)
  seconds           {method: [seconds per repeat]}; the methods alternate within each repeat
  speedup           median over repeats of exact_s / fisher_s (each pair timed back to back)
  truth_samples, truth_s  the reference: samples and seconds
  spearman          {method: rank correlation of its values with the truth's, over every pair}
  gaps              {method: [gap per budget of the grid]}, max_gap and mean_gap likewise
  fisher_seeds      [{seed, spearman, max_gap, mean_gap}] (seed 0: the "fisher" row above)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from scipy.stats import spearmanr

from hw_models import LayerChoice, Precision
from mpsearch.engine import sensitivity
from mpsearch.engine.ilp import choice_costs, solve_allocation
from mpsearch.engine.options import SearchOptions
from mpsearch.engine.sensitivity import METHODS, default_batches, measure_sensitivity
from mpsearch.engine.setup import make_evaluator, setup_space
from mpsearch.host import cpu_info
from mpsearch.targets import resolve_target
from mpsearch.tasks import load_task

GRID = 41  # budgets: with fewer, one budget's flip of one layer moves the max gap by several points
KEY = "weight_bytes"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--task", default="mobilenet_v2")
    ap.add_argument("--target", default="x86-vnni")
    ap.add_argument("--weights", default="int8,int4,int2", help="weight precisions of the space")
    ap.add_argument("--activations", default="int8", help="activation precisions of the space")
    ap.add_argument("--seeds", type=int, help="fisher seeds whose ranking quality is reported (default 5; --quick 2)")
    args = ap.parse_args()
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    cpu = cpu_info()
    log(f"cpu: {cpu.get('cpu')} ({', '.join(cpu.get('features', [])) or 'no int8 features'}), "
        f"{cpu.get('cores')} cores")

    t0 = time.perf_counter()
    task = load_task(args.task)
    options = SearchOptions(task=args.task, target=args.target, weight_precisions=tuple(args.weights.split(",")),
                            activation_precisions=tuple(args.activations.split(",")))
    analysis, space, cost_model, _ = setup_space(task, resolve_target(args.target), options)
    t1 = time.perf_counter()
    evaluator = make_evaluator(task, analysis, options, progress=False)
    evaluator_s = time.perf_counter() - t1
    pairs = {o.fqn: list(o.pairs) for o in space.options}
    n_pairs = sum(1 for per in pairs.values() for c in per if c.weight != Precision.FP32)
    log(f"{args.task} on {args.target}: {len(pairs)} layers, {n_pairs} pairs; evaluator built in {evaluator_s:.1f} s "
        f"(task loaded in {t1 - t0:.1f} s)")

    # the quantized weights both methods use, first (as an AdaRound search does), timed apart
    t2 = time.perf_counter()
    evaluator.precompute_weights(sorted({c.weight for per in pairs.values() for c in per if c.weight.is_int},
                                        key=lambda p: p.bits))
    weights_s = time.perf_counter() - t2
    log(f"quantized weights in {weights_s:.1f} s")

    repeats = 1 if args.quick else 3
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    values = {}
    for r in range(repeats):
        for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
            s = measure_sensitivity(evaluator, pairs, method=method)
            seconds[method].append(s.seconds)
            values[method] = s.values
            log(f"repeat {r + 1}/{repeats}: {method} {s.seconds:.1f} s ({s.path}{', ' + s.note if s.note else ''})")
    speedup = statistics.median(e / f for e, f in zip(seconds["exact"], seconds["fisher"], strict=True))
    n_seeds = args.seeds or (2 if args.quick else 5)
    seeded = [values["fisher"]]
    for seed in range(1, n_seeds):
        sensitivity.PROBE_SEED = seed
        seeded.append(measure_sensitivity(evaluator, pairs, method="fisher").values)
        log(f"fisher seed {seed} measured")
    sensitivity.PROBE_SEED = 0
    fisher_batches = default_batches(evaluator, sensitivity.FISHER_POOL * sensitivity.DEFAULT_SAMPLES)

    n_eval = len(task.eval_batches)
    truth_batches = default_batches(evaluator, 128) if args.quick else n_eval
    truth = measure_sensitivity(evaluator, pairs, method="exact", batches=truth_batches)
    truth_samples = sum(r.shape[0] for r in evaluator.reference_outputs[:truth_batches])
    samples = sum(r.shape[0] for r in evaluator.reference_outputs[: default_batches(evaluator)])
    pool = sum(r.shape[0] for r in evaluator.reference_outputs[:fisher_batches])
    log(f"truth: exact on {truth_samples} samples in {truth.seconds:.1f} s")
    evaluator.close()

    costs = choice_costs(cost_model, pairs)
    int8 = LayerChoice(Precision.INT8, Precision.INT8)
    top = sum(costs[f][int8][KEY] if int8 in costs[f] else max(v[KEY] for v in costs[f].values()) for f in pairs)
    low = sum(min(v[KEY] for v in costs[f].values()) for f in pairs)
    grid = [low + (top - low) * i / (GRID + 1) for i in range(1, GRID + 1)]

    def truth_sum(alloc) -> float:
        return sum(truth.values[f][alloc.choices[f]] for f in pairs)

    best = [solve_allocation(pairs, truth.values, costs, {KEY: b}, ties=space.ties) for b in grid]
    out = {"cpu": cpu, "task": args.task, "target": args.target, "pairs": n_pairs, "evaluator_s": evaluator_s, "weights_s": weights_s,
           "seconds": seconds, "speedup": speedup, "truth_samples": truth_samples, "truth_s": truth.seconds,
           "spearman": {}, "gaps": {}, "max_gap": {}, "mean_gap": {}}
    keys = [(f, c) for f in pairs for c in pairs[f] if c.weight != Precision.FP32]

    def judge(v) -> tuple[float, list[float]]:
        rho = float(spearmanr([truth.values[f][c] for f, c in keys], [v[f][c] for f, c in keys])[0])
        gaps = []
        for b, opt in zip(grid, best, strict=True):
            alloc = solve_allocation(pairs, v, costs, {KEY: b}, ties=space.ties)
            gaps.append(truth_sum(alloc) / truth_sum(opt) - 1 if truth_sum(opt) > 0 else 0.0)
        return rho, gaps

    for method in METHODS:
        out["spearman"][method], gaps = judge(values[method])
        out["gaps"][method] = gaps
        out["max_gap"][method] = max(gaps)
        out["mean_gap"][method] = statistics.mean(gaps)
    out["fisher_seeds"] = []
    for seed, v in enumerate(seeded):
        rho, gaps = judge(v)
        out["fisher_seeds"].append({"seed": seed, "spearman": rho, "max_gap": max(gaps), "mean_gap": statistics.mean(gaps)})

    print(f"\n{args.task} on {args.target}, weights {args.weights}, activations {args.activations}: {n_pairs} pairs; "
          f"exact on {samples} samples, fisher on about half of {pool}")
    print(f"{'method':8s} {'seconds (median)':>17s} {'spearman':>9s} {'ILP gap max':>12s} {'mean':>7s}")
    for method in METHODS:
        print(f"{method:8s} {statistics.median(seconds[method]):17.1f} {out['spearman'][method]:9.4f} "
              f"{out['max_gap'][method]:12.2%} {out['mean_gap'][method]:7.2%}")
    fs = out["fisher_seeds"]
    print(f"fisher over seeds 0-{len(fs) - 1}: ILP gap max " + " ".join(f"{x['max_gap']:.2%}" for x in fs)
          + f" (median {statistics.median(x['max_gap'] for x in fs):.2%}), mean "
          + " ".join(f"{x['mean_gap']:.2%}" for x in fs) + f" (mean {statistics.mean(x['mean_gap'] for x in fs):.2%})")
    print(f"exact / fisher time: {speedup:.2f}x (median of {repeats}); truth: exact on {truth_samples} samples, "
          f"{GRID} weight-byte budgets between the smallest allocation and all-int8")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
