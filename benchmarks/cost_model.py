"""Cost-model fidelity: predicted against measured latency of random mixed int8 / fp32 models.

    .venv/bin/python benchmarks/cost_model.py [--quick] [--json PATH] [--tasks digits,mobilenet_v2]
                                              [--threads N] [--batch-size B]

For each task: `mpsearch.calibration.cpu.calibrate` fits the x86-vnni profile on this machine (its own
seeded configurations); then N random per-layer {fp32, int8} configurations (another seed, so
held out from the fit) are each built as its deployed graph in ONNX Runtime (mpsearch.deploy.build
through mpsearch.deploy.measure.build_session: the graph `export --format onnx` writes; two sessions of
each, built separately, whose mean is the configuration's latency), timed interleaved against the
all-fp32 model (median over rounds of the ratio to the reference timed around it, times the
reference's median: drift cancels; each timing the median of enough back-to-back runs to last
2 ms), and priced by the uncalibrated x86-vnni profile, by the
calibrated profile's fitted roofline alone, and by the calibrated profile with its measured
per-layer table (what `mpsearch calibrate` writes).

--quick: 30 digits and 12 mobilenet_v2 configurations, 5 rounds (under 3 minutes here); the full
run: 40 each, 7 rounds.

JSON keys (one entry per task under "tasks"):
  n_configs            configurations measured
  int8_layers          per configuration, layers requested in int8
  int8_kernels         per configuration, int8 kernels in ONNX Runtime's optimized graph (one per
                       int8 layer in a deployed graph)
  measured_s           per configuration, measured latency (seconds): the mean of two separately
                       built ONNX Runtime sessions of it (on a ~40 us model, identical sessions
                       differ by up to ~15%: memory placement), each timed interleaved
  repeatability        {spearman, mape, within_10pct} of one session's timings against the other's:
                       the measurement's own noise, a ceiling for any cost model
  models               {uncalibrated, calibrated_roofline, calibrated_table}: each with
                       predicted_s (per configuration, relative to the reference: the model's
                       predicted ratio to the all-fp32 configuration times the fp32 latency
                       measured alongside, so that drift since calibration cancels), spearman
                       (rank correlation with measured), mape (mean absolute percentage error,
                       %), within_10pct (share of predictions within +-10% of measured), and
                       mape_absolute (MAPE of the raw predictions in seconds)
  calibration          the fitted figures (efficiency, overhead, transition cost, fit error)
  pricing_us           profile -> microseconds per CostModel.price of a random candidate (each layer
                       at one of the pairs the profile lists), median of 5 passes over 1,000
                       candidates: the calibrated profile (with its context table) and every
                       built-in target
  seconds              wall time of the task's benchmark
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time

import numpy as np

from hw_models import Candidate, CostModel, HardwareProfile, LayerChoice, get_profile, list_profiles
from mpsearch.cache import cache_dir
from mpsearch.calibration.cpu import calibrate, random_configs
from mpsearch.calibration.fit import fidelity as scores
from mpsearch.deploy.measure import build_session, config_candidate, time_interleaved, timing_number
from mpsearch.host import cpu_info
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks import load_task
from mpsearch.tasks.base import first_samples


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_task(name: str, n: int, rounds: int, threads: int, batch_size: int) -> dict:
    t0 = time.perf_counter()
    task = load_task(name)
    analysis = analyze(task.model, task.example_input)
    log(f"[{name}] calibrating")
    cal = calibrate(task, "x86-vnni", threads=threads, batch_size=batch_size, seed=1, progress=False)
    configs = random_configs(analysis.fqns, n, seed=2)
    evaluator = Evaluator(task, analysis, cache_dir=cache_dir("evaluator"))
    log(f"[{name}] building {n} mixed models")
    runners = {"fp32": build_session(task, analysis, evaluator, frozenset(), threads=threads)}
    for i, c in enumerate(configs):
        for copy in "ab":
            runners[f"c{i}{copy}"] = build_session(task, analysis, evaluator, c, threads=threads)
    evaluator.close()
    batch = first_samples(task.eval_batches[0][0], batch_size)
    log(f"[{name}] timing {n} configurations (two sessions each) interleaved with the fp32 reference, "
        f"{rounds} rounds")
    number = timing_number(runners["fp32"], batch)
    measured = time_interleaved(runners, batch, rounds=rounds, reference="fp32", seed=3, number=number)
    copies = {copy: np.array([measured[f"c{i}{copy}"] for i in range(n)]) for copy in "ab"}
    meas = ((copies["a"] + copies["b"]) / 2).tolist()
    repeat = scores(copies["a"], copies["b"])
    del repeat["predicted_s"]
    base = get_profile("x86-vnni")
    roofline_only = dataclasses.replace(cal.profile, layer_table=None)
    models = {}
    for key, prof in (("uncalibrated", base), ("calibrated_roofline", roofline_only),
                      ("calibrated_table", cal.profile)):
        cm = CostModel(analysis.layers, prof, batch_size, cal.graph)  # conversions where the deployed graph has them
        pred = [cm.price(config_candidate(analysis, c)).latency_s for c in configs]
        # relative to the fp32 reference timed alongside: drift since calibration cancels
        scale = measured["fp32"] / cm.price(config_candidate(analysis, frozenset())).latency_s
        models[key] = scores([x * scale for x in pred], meas)
        models[key]["mape_absolute"] = scores(pred, meas)["mape"]
    p = cal.profile
    return {
        "n_configs": n,
        "batch_size": batch_size,
        "threads": threads,
        "int8_layers": [len(c) for c in configs],
        "int8_kernels": [runners[f"c{i}a"].int8_kernels for i in range(n)],
        "measured_s": meas,
        "repeatability": repeat,
        "fp32_s": measured["fp32"],
        "models": models,
        "calibration": {"efficiency": dict(p.efficiency), "layer_overhead_s": p.layer_overhead_s,
                        "transition_overhead_s": p.transition_overhead_s,
                        "transition_bytes_per_elem": p.transition_bytes_per_elem, **cal.fit},
        "pricing_us": {prof.name: pricing_us(analysis.layers, prof, batch_size)
                       for prof in (cal.profile, *list_profiles())},
        "seconds": time.perf_counter() - t0,
    }


def pricing_us(layers, profile: HardwareProfile, batch_size: int, n: int = 1000, passes: int = 5) -> float:
    """Microseconds per CostModel.price of a random candidate over the pairs `profile` lists."""
    rng = random.Random(4)
    choices = [LayerChoice(r.weight, r.activation) for r in profile.rules]
    cands = [Candidate((x.fqn, rng.choice(choices)) for x in layers) for _ in range(n)]
    cm = CostModel(layers, profile, batch_size)
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for c in cands:
            cm.price(c)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times) * 1e6


def print_task(name: str, r: dict) -> None:
    meas = np.asarray(r["measured_s"]) * 1e3
    print(f"\n== {name}: {r['n_configs']} random fp32/int8 configurations, batch {r['batch_size']}, "
          f"{r['threads']} thread(s); measured {meas.min():.3g}-{meas.max():.3g} ms (fp32 {r['fp32_s'] * 1e3:.3g} ms)")
    k8 = sum(r["int8_kernels"])
    rp = r["repeatability"]
    print(f"two sessions of each configuration against each other: spearman {rp['spearman']:.3f}, "
          f"MAPE {rp['mape']:.1f}%, within 10% {rp['within_10pct']:.0%} (the measurement's own noise)")
    print(f"int8 layers requested {sum(r['int8_layers'])}, int8 kernels in ORT {k8} (over all configurations)")
    print(f"{'model':22s} {'spearman':>9s} {'MAPE %':>8s} {'within 10%':>11s} {'raw MAPE %':>11s}")
    for key, m in r["models"].items():
        print(f"{key:22s} {m['spearman']:9.3f} {m['mape']:8.1f} {m['within_10pct']:11.0%} {m['mape_absolute']:11.1f}")
    c = r["calibration"]
    print(f"calibrated: efficiency {c['efficiency']}, overhead {c['layer_overhead_s'] * 1e6:.3g} us, "
          f"transition {c['transition_overhead_s'] * 1e6:.3g} us + {c['transition_bytes_per_elem']:.3g} B/elem; "
          f"{r['seconds']:.0f} s")
    print("pricing one candidate (CostModel.price): "
          + ", ".join(f"{k} {v:.0f} us" for k, v in r["pricing_us"].items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (< 3 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--tasks", default="digits,mobilenet_v2")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=1)
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({cpu['machine']}, {cpu['cores']} cores); features: {', '.join(cpu['features']) or 'none'}")
    results = {"quick": args.quick, "cpu": cpu, "tasks": {}}
    for name in args.tasks.split(","):
        n = (30 if name == "digits" else 12) if args.quick else 40
        results["tasks"][name] = bench_task(name, n, 5 if args.quick else 7, args.threads, args.batch_size)
        print_task(name, results["tasks"][name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
