"""GPU profile validation: the h100 profile's predictions against matrix products timed on a GPU.

    .venv/bin/python benchmarks/gpu_profile.py [--quick] [--json PATH] [--target h100] [--profile-out F.toml]

Needs a CUDA GPU (exits with status 2 and one line without one). Besides this repository it
imports only torch, torchvision, numpy and tqdm (no Optuna, MLflow or Ray), so on a bare GPU box
`PYTHONPATH=. python3 benchmarks/gpu_profile.py` runs it from a checkout without installing.

What it does (`mpsearch.calibration.gpu`): checks each kind's kernel against an fp32 reference,
measures the copy bandwidth, times fp32 / bf16 / fp8 / int8 / int4-weight-only products (a
transformer-style sweep from m = 1 to 8192 x 8192 x 8192, and mobilenet_v2's convolutions
lowered to GEMMs at batch 32 and 256; depthwise convolutions are not GEMMs and are left out)
as CUDA-graph replays, fits the profile, and prints how well the profile as given, a profile
fitted on half of the products (predicting the other half) and the final fit predict the
measured latencies. It also times the whole mobilenet_v2 network (fp32 and bf16, channels-last,
batch norms folded, CUDA graph) against the profile's network prediction, which prices only the
convolutions and the classifier (elementwise operations are not in the cost model).

--quick: fewer sweep shapes and batch 32 only (about 1 minute on an H100); the full run about 3.

JSON keys:
  device               the GPU's name
  software             the PyTorch and CUDA versions that ran the kernels
  copy_bandwidth_Bps   measured copy bandwidth (bytes read + written per second)
  checks               kind -> "" (kernel agrees with the fp32 reference) or why it was not timed
  failed               products a kernel refused (one line each)
  products             one entry per timed product: name, m, k, n, kind, measured_s, mode (graph /
                       eager), tflops, uncalibrated_s and calibrated_s (the profiles' predictions)
  peak_tflops          kind -> TFLOP/s of the 8192^3 product; datasheet_tflops: the profile's peak
  validation           {uncalibrated, held_out, calibrated} -> {native, fp32, bf16, fp8, int8, int4w}
                       -> {n, spearman, mape (%), within_10pct}; held_out: fitted on the even
                       products, scored on the odd ones
  speedups             per product and kind: measured and predicted (uncalibrated, calibrated)
                       latency ratio bf16 / kind
  calibrated           the fitted figures: efficiency per compute kind, layer_overhead_s,
                       mem_bw_bytes_per_s, rms_log (fit error)
  network              mobilenet_v2 end to end: per (dtype, batch) measured_s, uncalibrated_s,
                       calibrated_s
  seconds              wall time
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from hw_models import Candidate, CostModel, Precision, get_profile
from hw_models.profile_file import dump_profile
from mpsearch.calibration.gpu import KINDS, calibrate_gpu, gemm_sweep, layer_gemms, predict, software


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mobilenet():
    """torchvision's mobilenet_v2 (random weights: latency does not depend on them), batch norms
    folded, and its layers as the cost model sees them."""
    import torchvision

    from mpsearch.scoring.analysis import analyze
    from mpsearch.scoring.folding import fold_batchnorm

    model = torchvision.models.mobilenet_v2(weights=None).eval()
    model, _ = fold_batchnorm(model)
    return model, analyze(model, torch.randn(1, 3, 224, 224), batch_size=1)


def time_network(model, batch: int, dtype: torch.dtype, rounds: int = 10) -> float:
    """Seconds per forward pass: CUDA-graph replays of the channels-last network."""
    net = model.to("cuda", dtype).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                net(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            net(x)
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(rounds):
            start.record()
            for _ in range(5):
                graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / 5)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced run (about a minute on an H100)")
    ap.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    ap.add_argument("--target", default="h100", help="the GPU profile to validate (default h100)")
    ap.add_argument("--profile-out", metavar="FILE.toml", help="also write the calibrated profile")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_profile.py: needs a CUDA GPU; torch sees none on this machine", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    torch.backends.cudnn.allow_tf32 = False  # fp32 convolutions on CUDA cores, as the profile prices them
    base = get_profile(args.target)
    model, analysis = mobilenet()
    batches = (32,) if args.quick else (32, 256)
    gemms = gemm_sweep(args.quick) + [g for b in batches for g in layer_gemms(analysis.layers, b)]
    log(f"{len(gemms)} products x {len(KINDS)} kinds on {torch.cuda.get_device_name(0)}")
    cal = calibrate_gpu(base, gemms, rounds=7 if args.quick else 10, context="benchmarks/gpu_profile.py")
    print(cal.summary())

    products = [{"name": m.gemm.name, "m": m.gemm.m, "k": m.gemm.k, "n": m.gemm.n, "kind": m.kind,
                 "measured_s": m.seconds, "mode": m.mode, "tflops": m.tflops,
                 "uncalibrated_s": predict(base, m), "calibrated_s": predict(cal.profile, m)} for m in cal.measurements]
    peak = {m.kind: m.tflops for m in cal.measurements if m.gemm.name == "peak"}
    speedups = cal.speedups()
    print("\nspeedup over bf16 (latency bf16 / kind), median over products; m = rows of the product")
    print(f"{'kind':6s} {'rows':>12s} {'measured':>9s} {'uncalib.':>10s} {'calibrated':>11s}")
    for kind in KINDS:
        for label, sel in (("m <= 16", lambda s: s["m"] <= 16), ("32-512", lambda s: 32 <= s["m"] <= 512),
                           ("m >= 2048", lambda s: s["m"] >= 2048)):
            rows = [s for s in speedups if s["kind"] == kind and sel(s)]
            if rows:
                med = {k: statistics.median(s[k] for s in rows) for k in ("measured", "uncalibrated", "calibrated")}
                print(f"{kind:6s} {label:>12s} {med['measured']:9.2f} {med['uncalibrated']:10.2f} {med['calibrated']:11.2f}")

    network = []
    print("\nmobilenet_v2 end to end (CUDA graph, channels-last, BN folded): measured vs the profiles' sum "
          "over layers")
    for dtype, prec in ((torch.float32, Precision.FP32), (torch.bfloat16, Precision.BF16)):
        for b in batches:
            seconds = time_network(model, b, dtype)
            cand = Candidate.uniform(analysis.fqns, prec, prec)
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": b, "measured_s": seconds,
                   "uncalibrated_s": CostModel(analysis.layers, base, b).price(cand).latency_s,
                   "calibrated_s": CostModel(analysis.layers, cal.profile, b).price(cand).latency_s}
            network.append(row)
            print(f"{row['dtype']:9s} batch {b:4d}: measured {seconds * 1e3:8.3f} ms, uncalibrated "
                  f"{row['uncalibrated_s'] * 1e3:8.3f} ms, calibrated {row['calibrated_s'] * 1e3:8.3f} ms")

    p = cal.profile
    results = {
        "quick": args.quick, "device": cal.device_name, "software": software(),
        "copy_bandwidth_Bps": cal.copy_bandwidth, "checks": cal.checks,
        "failed": cal.failed,
        "products": products, "peak_tflops": peak,
        "datasheet_tflops": {k: 2 * base.peak_macs_per_s[base.rule(*KINDS[k]).compute] / 1e12 for k in KINDS},
        "validation": cal.validation(), "speedups": speedups,
        "calibrated": {"efficiency": dict(p.efficiency), "layer_overhead_s": p.layer_overhead_s,
                       "mem_bw_bytes_per_s": p.mem_bw_bytes_per_s, **cal.fit},
        "network": network, "seconds": time.perf_counter() - t0,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.profile_out:
        Path(args.profile_out).write_text(dump_profile(replace(p, name=Path(args.profile_out).stem)))
    log(f"{results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
