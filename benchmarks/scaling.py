"""Distributed search: trials per second with 1 and 2 Ray workers, and what Ray adds per trial.

    .venv/bin/python benchmarks/scaling.py [--quick] [--json PATH]

On digits (x86-vnni, --strategy optuna, every candidate scored: no budget), the same seeded
search runs in this process (backend local, one torch thread) and on a local Ray instance started
once here with one worker and with two (one torch thread each), interleaved, `--reps` times
(--quick: 1) with `--trials` trials each (--quick: 60), for each sampler of `--samplers`
(default random and tpe). Throughput is trials / the search loop's wall time
(settings["search_s"]: first ask to last tell; Ray's start and the workers' set-up are one-time
costs, reported apart). Goal on a 2-core machine: 2 workers at least 1.7x the trials per second
of 1.

The driver asks, prices and tells every trial and rewrites result.json, one trial after the
other; with W workers it asks trial k right after telling trial k - W. So W workers reach at most
min(W / (scoring + driver), 1 / driver, cores / CPU a trial) trials a second, where `driver_ms`
(asking with the sampler and the study's storage, pricing, telling; result.json's rewrite, ~5 ms
at 150 trials, comes on top) is serial work on one core. With a cheap sampler two workers come
near 2x; with TPE, whose ask costs ~10 ms a trial at 150 trials, the driver (~21 ms a trial with
the rewrite) caps 2 workers at ~47 trials/s against ~30 for one, whatever the cluster.

Measured here (full runs, 3 reps each, two runs): 2 workers over 1 ranged 1.39-1.90x per rep
(random sampler: 1.85x and 1.51x medians; TPE: 1.55x and 1.78x): the goal is met in some runs,
not reliably; this 2-core machine's drift (the local baseline alone ranged 30-43 trials/s within
one run) is as large as the gap. Ray's overhead per trial over a local run: 0-6.5 ms, within
that noise. A 1-worker Ray search proposes exactly the configurations of a local one.

JSON keys:
  trials, reps                the run's size
  ray_start_s                 seconds to start the local Ray instance (once)
  samplers                    {sampler: {runs, speedup_2_vs_1, ray_overhead_ms, same_configs_local_ray1}}
  runs                        {local | ray1 | ray2: {trials_per_s: [per rep], median,
                              scoring_ms (mean per scored trial, where it ran), driver_ms (mean per
                              trial on the driver: asking + telling (sampler, storage) + pricing),
                              worker_startup_s (Ray runs: building the task on the workers)}}
  speedup_2_vs_1              median over reps of trials/s of 2 workers over 1 in that rep (goal >= 1.7)
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


def measure(sampler: str, trials: int, reps: int, tmp: Path) -> dict:
    kinds = ("local", "ray1", "ray2")
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    configs: dict[str, list] = {}
    for rep in range(reps):
        for kind in kinds:
            stats, cfgs = run(kind, trials, sampler, tmp)
            runs[kind].append(stats)
            configs.setdefault(kind, cfgs)
            print(f"{sampler} rep {rep + 1}/{reps} {kind:5s}: {stats['trials_per_s']:6.1f} trials/s, scoring "
                  f"{stats['scoring_ms']:5.1f} ms, driver {stats['driver_ms']:5.1f} ms a trial", file=sys.stderr)
    out: dict = {"runs": {}}
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
    # paired: the two runs of one rep ran minutes apart at most (the machine drifts)
    out["speedup_2_vs_1"] = statistics.median(
        a["trials_per_s"] / b["trials_per_s"] for a, b in zip(runs["ray2"], runs["ray1"], strict=True))
    out["ray_overhead_ms"] = 1e3 * (1 / med["ray1"] - 1 / med["local"])
    out["same_configs_local_ray1"] = configs["local"] == configs["ray1"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--trials", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--samplers", default="random,tpe")
    args = ap.parse_args()
    trials = args.trials or (60 if args.quick else 150)
    reps = args.reps or (1 if args.quick else 3)
    samplers = [x for x in args.samplers.split(",") if x]
    torch.set_num_threads(1)  # the local baseline scores with one thread, like each worker

    import logging

    import ray

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start_s = time.perf_counter() - t0
    out = {"trials": trials, "reps": reps, "ray_start_s": ray_start_s, "samplers": {}}
    try:
        with tempfile.TemporaryDirectory() as d:
            run("local", 10, "random", Path(d))  # warm the evaluator cache and the digits model
            for sampler in samplers:
                out["samplers"][sampler] = measure(sampler, trials, reps, Path(d))
    finally:
        ray.shutdown()

    print(f"digits, {trials} trials x {reps} rep(s); Ray started in {ray_start_s:.1f} s")
    print(f"{'sampler':8s} {'run':6s} {'trials/s':>9s} {'scoring ms':>11s} {'driver ms':>10s} {'worker set-up s':>16s}")
    for sampler, m in out["samplers"].items():
        for kind, r in m["runs"].items():
            print(f"{sampler:8s} {kind:6s} {r['median']:9.1f} {r['scoring_ms']:11.1f} {r['driver_ms']:10.1f} "
                  f"{r['worker_startup_s']:16.1f}")
    for sampler, m in out["samplers"].items():
        verdict = "met" if m["speedup_2_vs_1"] >= GOAL else "NOT met"
        print(f"{sampler}: 2 workers / 1 worker {m['speedup_2_vs_1']:.2f}x (goal >= {GOAL}: {verdict}); Ray's "
              f"overhead per trial over a local run {m['ray_overhead_ms']:.1f} ms; 1 worker proposes what a local "
              f"run does: {m['same_configs_local_ray1']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
