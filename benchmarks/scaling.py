"""Distributed search: trials per second with 1 and 2 Ray workers, and what Ray adds per trial.

    .venv/bin/python benchmarks/scaling.py [--quick] [--json PATH]

On digits (x86-vnni, --strategy optuna, every candidate scored: no budget), the same seeded
search runs in this process (backend local, one torch thread) and on a local Ray instance started
once here with one worker and with two (one torch thread each), interleaved, `--reps` times
(--quick: 1) with `--trials` trials each (--quick: 60). Throughput is trials / the search loop's
wall time (settings["search_s"]: first ask to last tell; Ray's start and the workers' set-up are
one-time costs, reported apart). The sampler is TPE (the default) unless --sampler says otherwise.
Goal on a 2-core machine: 2 workers at least 1.7x the trials per second of 1.

The driver asks, prices and tells every trial and rewrites result.json; with W workers it asks
trial k right after telling trial k - W, so a worker waits while the driver tells and asks. Per
trial that driver time is `driver_ms` below; when it approaches the scoring time the driver,
not the workers, sets the pace (and on 2 cores it shares them with the workers and Ray).

JSON keys:
  trials, reps, sampler       the run's size and sampler
  ray_start_s                 seconds to start the local Ray instance (once)
  runs                        {local | ray1 | ray2: {trials_per_s: [per rep], median,
                              scoring_ms (mean per scored trial, where it ran), driver_ms (mean per
                              trial: sampler + pricing + telling + result.json, on the driver),
                              worker_startup_s (Ray runs: building the task on the workers)}}
  speedup_2_vs_1              median trials/s of 2 workers over 1 (goal >= 1.7)
  ray_overhead_ms             per-trial wall time of 1 Ray worker minus the local run's (medians)
  same_configs_local_ray1     whether the local run and the 1-worker run proposed the same configurations
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from mpsearch.api import search

GOAL = 1.7


def run(kind: str, trials: int, sampler: str, tmp: Path) -> tuple[dict, list]:
    workers = {"local": None, "ray1": 1, "ray2": 2}[kind]
    r = search("digits", n_trials=trials, seed=0, sampler=sampler, strategy="optuna", track=False, progress=False,
               out_dir=tmp / f"{kind}-{time.monotonic_ns()}", backend="local" if workers is None else "ray",
               workers=workers)
    n = len(r.trials)
    scored = [t for t in r.trials if t.state == "complete" and t.scoring_s > 0]
    loop = r.settings["search_s"]
    stats = {
        "trials_per_s": n / loop,
        "scoring_ms": 1e3 * statistics.fmean(t.scoring_s for t in scored) if scored else float("nan"),
        # the driver's own work per trial, as the records hold it: asking + telling, pricing
        "driver_ms": 1e3 * statistics.fmean(t.sampler_s + t.pricing_s for t in r.trials),
        "worker_startup_s": r.settings.get("worker_startup_s", 0.0),
    }
    return stats, [t.config.to_dict() for t in r.trials]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--sampler", default="tpe")
    args = ap.parse_args()
    trials = args.trials or (60 if args.quick else 150)
    reps = args.reps or (1 if args.quick else 3)
    torch.set_num_threads(1)  # the local baseline scores with one thread, like each worker

    import logging

    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - t0
    kinds = ("local", "ray1", "ray2")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    configs: dict[str, list] = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            run("local", 10, args.sampler, Path(d))  # warm the evaluator cache and the digits model
            for rep in range(reps):
                for kind in kinds:
                    stats, cfgs = run(kind, trials, args.sampler, Path(d))
                    runs[kind].append(stats)
                    configs.setdefault(kind, cfgs)
                    print(f"rep {rep + 1}/{reps} {kind:5s}: {stats['trials_per_s']:6.1f} trials/s, scoring "
                          f"{stats['scoring_ms']:5.1f} ms, driver {stats['driver_ms']:5.1f} ms a trial",
                          file=sys.stderr)
    finally:
        ray.shutdown()

    out = {"trials": trials, "reps": reps, "sampler": args.sampler, "ray_start_s": ray_start_s, "runs": {}}
    for kind in kinds:
        tps = [s["trials_per_s"] for s in runs[kind]]
        out["runs"][kind] = {
            "trials_per_s": tps,
            "median": statistics.median(tps),
            "scoring_ms": statistics.median(s["scoring_ms"] for s in runs[kind]),
            "driver_ms": statistics.median(s["driver_ms"] for s in runs[kind]),
            "worker_startup_s": statistics.median(s["worker_startup_s"] for s in runs[kind]),
        }
    med = {k: out["runs"][k]["median"] for k in kinds}
    out["speedup_2_vs_1"] = med["ray2"] / med["ray1"]
    out["ray_overhead_ms"] = 1e3 * (1 / med["ray1"] - 1 / med["local"])
    out["same_configs_local_ray1"] = configs["local"] == configs["ray1"]

    print(f"digits, {trials} trials x {reps} rep(s), sampler {args.sampler}; Ray started in {ray_start_s:.1f} s")
    print(f"{'run':8s} {'trials/s':>9s} {'scoring ms':>11s} {'driver ms':>10s} {'worker set-up s':>16s}")
    for kind in kinds:
        r = out["runs"][kind]
        print(f"{kind:8s} {r['median']:9.1f} {r['scoring_ms']:11.1f} {r['driver_ms']:10.1f} {r['worker_startup_s']:16.1f}")
    verdict = "met" if out["speedup_2_vs_1"] >= GOAL else "NOT met"
    print(f"2 workers / 1 worker: {out['speedup_2_vs_1']:.2f}x (goal >= {GOAL}: {verdict})")
    print(f"Ray's overhead per trial over a local run: {out['ray_overhead_ms']:.1f} ms; "
          f"1 worker proposes what a local run does: {out['same_configs_local_ray1']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
