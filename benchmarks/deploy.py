"""Deployed int8 graphs: mpsearch's against ONNX Runtime's own quantize_static, the simulation
against ONNX Runtime, and the calibrated cost model against held-out deployed mixes.

    .venv/bin/python benchmarks/deploy.py [--quick] [--json PATH] [--tasks digits,mobilenet_v2]
                                          [--no-fidelity]

1. Latency, per task, threads (1, 2) and batch size (1, 8): the FP32 graph, mpsearch's all-int8
   deployed graph (mpsearch.deploy.build, what `export --format onnx` writes and `calibrate` and
   `verify` time) and `onnxruntime.quantization.quantize_static` of the same FP32 graph (QDQ,
   per-channel int8 weights, uint8 activations, MinMax on the task's calibration batches: ONNX
   Runtime's recommended settings for x86 with VNNI), built in one process and timed interleaved
   against the FP32 graph (mpsearch.deploy.measure.time_interleaved: drift cancels); their ratios and
   the int8 kernels in each optimized graph.
2. Simulation against ONNX Runtime: top-1 agreement (classifiers) between the evaluator's
   simulated model and the deployed graph over the evaluation set, all-int8 and random
   fp32 / int8 mixes (10; 3 with --quick), with the int8 kernels against the int8 layers of each.
3. Fidelity of the calibrated cost model (mobilenet_v2): `mpsearch calibrate` on this machine,
   then held-out random fp32 / int8 mixes (30; 12 with --quick) built as deployed graphs and timed
   interleaved, at 1 and 2 threads: Spearman, MAPE and share within 10% of the calibrated
   profile and of the built-in x86-vnni profile (benchmarks/cost_model.py's method).

Prints the CPU (model and features: avx2, avx512f, avx512_vnni, amx_int8, ...) it ran on. The full
run takes about 4 minutes here (2 cores), --quick about 2. Timings at 2 threads need both cores
idle: another process running meanwhile shows as a poor repeatability line.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hw_models import Candidate, LayerChoice, Precision
from mpsearch import metrics
from mpsearch.cache import cache_dir
from mpsearch.deploy.build import build
from mpsearch.deploy.measure import time_interleaved, timing_number
from mpsearch.host import cpu_info
from mpsearch.onnx_export import OrtRunner
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks import load_task
from mpsearch.tasks.base import first_samples

W8A8 = LayerChoice(Precision.INT8, Precision.INT8)
FP32 = LayerChoice(Precision.FP32, Precision.FP32)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantize_static_graph(evaluator: Evaluator, task) -> object:
    """ONNX Runtime's quantize_static of the evaluator's FP32 graph (its recommended CPU settings)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": b.numpy()} for b in task.calib_batches])

        def get_next(self):
            return next(self.it, None)

    import logging

    logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" warning
    with tempfile.TemporaryDirectory() as d:
        onnx.save(evaluator.fp32_onnx, f"{d}/fp32.onnx")
        quantize_static(f"{d}/fp32.onnx", f"{d}/qs.onnx", Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return onnx.load(f"{d}/qs.onnx")


def latency(task, evaluator, analysis, qs_proto, threads: int, batch_size: int, rounds: int) -> dict:
    int8 = Candidate((f, W8A8) for f in analysis.fqns)
    runners = {"fp32": OrtRunner(evaluator.fp32_onnx, threads=threads),
               "mpsearch_int8": OrtRunner(build(evaluator, int8).proto, threads=threads),
               "quantize_static": OrtRunner(qs_proto, threads=threads)}
    batch = first_samples(task.eval_batches[0][0], batch_size)
    number = timing_number(runners["fp32"], batch)
    t = time_interleaved(runners, batch, rounds=rounds, reference="fp32", number=number)
    return {
        "threads": threads, "batch_size": batch_size,
        "latency_ms": {k: v * 1e3 for k, v in t.items()},
        "speedup_over_fp32": {k: t["fp32"] / v for k, v in t.items()},
        "mpsearch_over_quantize_static": t["mpsearch_int8"] / t["quantize_static"],
        "int8_kernels": {k: r.int8_kernels for k, r in runners.items()},
    }


def agreement(task, evaluator, analysis, n_mixes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    cands = {"all_int8": Candidate((f, W8A8) for f in analysis.fqns)}
    for i in range(n_mixes):
        p = rng.random()
        cands[f"mix_{i}"] = Candidate((f, W8A8 if rng.random() < p else FP32) for f in analysis.fqns)
    out = {}
    for name, cand in cands.items():
        runner = OrtRunner(build(evaluator, cand).proto, threads=2)
        ort = [runner.run(x) for x, _ in task.eval_batches]
        sim = evaluator.outputs(cand)
        agree = metrics.top1_agreement(ort, sim) if task.kind == "classifier" else metrics.mean_cosine(ort, sim)
        out[name] = {"agreement": agree, "int8_layers": sum(c == W8A8 for c in cand.values()),
                     "int8_kernels": runner.int8_kernels,
                     "sim_metric": task.score_outputs(sim), "ort_metric": task.score_outputs(ort)}
    return out


def bench_task(name: str, quick: bool) -> dict:
    t0 = time.perf_counter()
    task = load_task(name)
    analysis = analyze(task.model, task.example_input)
    evaluator = Evaluator(task, analysis, cache_dir=cache_dir("evaluator"))
    evaluator.save_cache()
    log(f"[{name}] quantize_static")
    qs = quantize_static_graph(evaluator, task)
    rows = []
    for threads in (1, 2):
        for batch in (1, 8):
            log(f"[{name}] latency, {threads} thread(s), batch {batch}")
            rows.append(latency(task, evaluator, analysis, qs, threads, batch, 9 if quick else 15))
    n_mix = 3 if quick else 10
    log(f"[{name}] simulation against ONNX Runtime: all-int8 and {n_mix} mixes")
    agree = agreement(task, evaluator, analysis, n_mix)
    evaluator.close()
    return {"latency": rows, "agreement": agree, "seconds": time.perf_counter() - t0}


def fidelity(quick: bool) -> dict:
    from cost_model import bench_task as cost_bench

    out = {}
    for threads in (1, 2):
        log(f"[mobilenet_v2] calibrated fidelity at {threads} thread(s)")
        r = cost_bench("mobilenet_v2", 12 if quick else 30, 5 if quick else 7, threads, 1)
        out[str(threads)] = {k: r[k] for k in ("n_configs", "threads", "repeatability", "models", "calibration",
                                               "int8_layers", "int8_kernels", "fp32_s", "seconds")}
    return out


def print_task(name: str, r: dict) -> None:
    print(f"\n== {name}")
    print(f"{'threads':>7s} {'batch':>5s} {'fp32 ms':>9s} {'mpsearch ms':>11s} {'q_static ms':>11s} "
          f"{'mps x':>6s} {'qs x':>6s} {'mps/qs':>7s} {'int8 k. (mps/qs)':>17s}")
    for row in r["latency"]:
        lat, sp, k = row["latency_ms"], row["speedup_over_fp32"], row["int8_kernels"]
        print(f"{row['threads']:7d} {row['batch_size']:5d} {lat['fp32']:9.4g} {lat['mpsearch_int8']:11.4g} "
              f"{lat['quantize_static']:11.4g} {sp['mpsearch_int8']:5.2f}x {sp['quantize_static']:5.2f}x "
              f"{row['mpsearch_over_quantize_static']:7.3f} {k['mpsearch_int8']:>8d}/{k['quantize_static']}")
    print("simulation vs ONNX Runtime (top-1 agreement; int8 kernels / int8 layers):")
    for k, a in r["agreement"].items():
        print(f"  {k:9s} {a['agreement']:.4f}  {a['int8_kernels']}/{a['int8_layers']}  "
              f"metric sim {a['sim_metric']:.4f} ORT {a['ort_metric']:.4f}")


def print_fidelity(f: dict) -> None:
    print("\n== mobilenet_v2: cost model against held-out deployed fp32/int8 mixes")
    for threads, r in f.items():
        rp = r["repeatability"]
        print(f"{threads} thread(s), {r['n_configs']} mixes, fp32 {r['fp32_s'] * 1e3:.3g} ms; two sessions of each "
              f"against each other: spearman {rp['spearman']:.3f}, within 10% {rp['within_10pct']:.0%}")
        for key, m in r["models"].items():
            print(f"  {key:22s} spearman {m['spearman']:.3f}  MAPE {m['mape']:5.1f}%  within 10% {m['within_10pct']:.0%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and mixes (about 2 minutes)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--tasks", default="digits,mobilenet_v2")
    ap.add_argument("--no-fidelity", action="store_true", help="skip the calibrated cost model's fidelity (part 3)")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"CPU: {cpu['cpu']} ({cpu['machine']}, {cpu['cores']} cores); features: {', '.join(cpu['features']) or 'none'}")
    results = {"quick": args.quick, "cpu": cpu, "tasks": {}}
    for name in args.tasks.split(","):
        results["tasks"][name] = bench_task(name, args.quick)
        print_task(name, results["tasks"][name])
    if not args.no_fidelity:
        results["fidelity"] = fidelity(args.quick)
        print_fidelity(results["fidelity"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
