"""`mpsearch verify`: the front's configurations as deployed graphs, measured on real hardware.

`verify(result_dir, top=N)` reads a finished search's result.json and, for the N front
configurations with the highest metric and the search's best, builds each one's deployed graph
(mpsearch.deploy.build: the graph `export --format onnx` writes), times them in ONNX Runtime
interleaved with the FP32 and the uniform int8 graphs (mpsearch.deploy.measure.time_interleaved: drift
cancels), and runs the evaluation set through each: the measured latency, speed-up over FP32 and
metric stand beside the predicted ones. The front is drawn again from the measurements (metric
measured in ONNX Runtime against latency measured). The figures go into result.json under
"verification" (schema VERIFY_SCHEMA) and into the HTML report.

Where it measures. backend "local": on this machine. backend "ray": on a node of the Ray cluster
that carries a custom resource named after the search's target (start the target machines with
`ray start ... --resources '{"x86-vnni": 1}'`), so a cluster of real target machines measures on
its own hardware; when no node carries it, on this machine, and the result says so. Either way
the verification records the host, its CPU model and its CPU features (avx2, avx512f,
avx512_vnni, amx_int8, ...), threads and batch size.

Only targets measured with ONNX Runtime on a CPU can be verified (x86-vnni, arm-a76 and CPU
profiles made by `mpsearch calibrate`); a result of another task or model than the one loaded
now (its evaluator fingerprint differs) is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hw_models import Candidate, LayerChoice, Precision
from mpsearch.errors import InvalidConfigError
from mpsearch.host import cpu_info

__all__ = ["VERIFY_SCHEMA", "cpu_info", "measure_candidates", "verify"]

VERIFY_SCHEMA = "mpsearch.verify/1"
DEFAULT_TOP = 3
DEFAULT_ROUNDS = 7


def measure_candidates(
    task_ref: Any,
    quant: Mapping[str, Any] | None,
    candidates: Mapping[str, Candidate],
    *,
    threads: int | None,
    batch_size: int,
    rounds: int = DEFAULT_ROUNDS,
    fingerprint: str | None = None,
    progress: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Deployed graphs of `candidates` (name -> Candidate; "fp32" is the reference), timed
    interleaved on one batch of `batch_size` evaluation samples and run on every evaluation batch.

    Returns {"where": cpu_info + threads + batch_size, "configs": {name: {latency_ms, metric,
    sim_agreement, int8_kernels, storage, notes}}}. Raises InvalidConfigError when the task's model
    is not the one the candidates were searched on (`fingerprint`, Evaluator.fingerprint) or its
    layers differ."""
    from tqdm import tqdm

    from mpsearch import metrics
    from mpsearch.cache import cache_dir
    from mpsearch.deploy.build import build
    from mpsearch.deploy.measure import ConfigRunner, time_interleaved, timing_number
    from mpsearch.scoring.analysis import analyze
    from mpsearch.scoring.evaluator import Evaluator, QuantSettings
    from mpsearch.tasks import load_task
    from mpsearch.tasks.base import first_samples

    task = load_task(task_ref) if isinstance(task_ref, str) else task_ref
    analysis = analyze(task.model, task.example_input)
    fqns = set(analysis.fqns)
    for name, cand in candidates.items():
        if set(cand) != fqns:
            extra = sorted(set(cand) - fqns)[:3] or sorted(fqns - set(cand))[:3]
            raise InvalidConfigError(f"configuration {name}'s layers are not those of task {task.name}'s model "
                                     f"(first differences: {', '.join(extra)}): a result of another model")
    settings = QuantSettings(**quant) if quant else QuantSettings()
    ev = Evaluator(task, analysis, settings, cache_dir=cache_dir("evaluator"))
    try:
        if fingerprint is not None and ev.fingerprint() != fingerprint:
            raise InvalidConfigError(f"the search ran on another model or data than task {task.name} gives now "
                                     f"(fingerprint {fingerprint}, now {ev.fingerprint()})")
        runners = {}
        bar = tqdm(candidates.items(), desc="building deployed graphs", unit="graph", file=sys.stderr,
                   disable=not progress)
        for name, cand in bar:
            runners[name] = ConfigRunner(build(ev, cand), threads)
        batch = first_samples(task.eval_batches[0][0], batch_size)
        number = timing_number(runners["fp32"], batch)
        if progress:
            print(f"mpsearch: timing {len(runners)} graphs interleaved, {rounds} rounds", file=sys.stderr)
        times = time_interleaved(runners, batch, rounds=rounds, reference="fp32", number=number, seed=seed)
        configs = {}
        for name, r in tqdm(runners.items(), desc="evaluating in ONNX Runtime", unit="graph", file=sys.stderr,
                            disable=not progress):
            ort = [r.run(inputs) for inputs, _ in task.eval_batches]
            sim = ev.outputs(r.candidate)
            agree = (metrics.top1_agreement(ort, sim) if task.kind == "classifier"
                     else metrics.mean_cosine(ort, sim))
            configs[name] = {
                "latency_ms": times[name] * 1e3,
                "metric": task.score_outputs(ort),
                "sim_metric": task.score_outputs(sim),
                "sim_agreement": agree,
                "int8_kernels": r.int8_kernels,
                "storage": r.deployment.storage,
                "notes": r.deployment.notes,
            }
        ev.save_cache()
    finally:
        ev.close()
    where = {**cpu_info(), "threads": threads, "batch_size": batch_size, "rounds": rounds}
    return {"where": where, "configs": configs}


def _uniform_int8(config: Candidate, target_rule) -> Candidate:
    """Uniform int8: every layer at int8/int8 where the target runs it, else as it is."""
    w8a8 = LayerChoice(Precision.INT8, Precision.INT8)
    return Candidate((f, w8a8 if target_rule(w8a8) else c) for f, c in config.items())


def measured_front(points: Mapping[int, tuple[float, float]]) -> list[int]:
    """Trial numbers not dominated in (measured metric, max; measured latency, min), by latency."""
    out = []
    for n, (m, lat) in points.items():
        if not any((m2 >= m and l2 <= lat) and (m2 > m or l2 < lat) for k, (m2, l2) in points.items() if k != n):
            out.append(n)
    return sorted(out, key=lambda n: points[n][1])


def verify(
    result_dir: str | Path,
    *,
    top: int = DEFAULT_TOP,
    threads: int | None = None,
    batch_size: int | None = None,
    rounds: int = DEFAULT_ROUNDS,
    backend: str = "local",
    ray_address: str | None = None,
    progress: bool = True,
    task: str | None = None,
) -> dict[str, Any]:
    """Measure the front of the search in `result_dir` as deployed graphs (module doc); write the
    verification into its result.json and report, and return it. Holds the directory's
    OutputLock while it measures and writes. task: the search's task, named by the user; needed
    when result.json names a task file or module (mpsearch.tasks.trusted_task: code runs only
    from a task the user names), not for a built-in task."""
    from mpsearch.outlock import OutputLock
    from mpsearch.results.records import SearchResult
    from mpsearch.tasks import trusted_task

    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InvalidConfigError(f"--top must be a non-negative integer, got {top!r}")
    if rounds < 1:
        raise InvalidConfigError(f"rounds must be at least 1, got {rounds}")
    if backend not in ("local", "ray"):
        raise InvalidConfigError(f"unknown backend {backend!r} (known: local, ray)")
    out = Path(result_dir)
    path = out / "result.json" if out.is_dir() else out
    res = SearchResult.read(path)  # a missing or broken result.json: its one-line error, before any lock
    task_ref = trusted_task(res.settings.get("task_ref") or res.task, task, str(path))
    with OutputLock(path.parent, "mpsearch verify"):  # nobody else writes this result.json meanwhile
        return _verify(path, task_ref, top, threads, batch_size, rounds, backend, ray_address, progress)


def _verify(path: Path, task_ref: str, top: int, threads: int | None, batch_size: int | None, rounds: int,
            backend: str, ray_address: str | None, progress: bool) -> dict[str, Any]:
    from mpsearch.errors import MpsearchError
    from mpsearch.results.records import SearchResult
    from mpsearch.targets import resolve_target

    res = SearchResult.read(path)
    target_ref = res.settings.get("target_ref") or res.target
    try:
        profile = resolve_target(target_ref)
    except MpsearchError:
        raise InvalidConfigError(f"{path}: target {target_ref!r} cannot be found here (a profile file that moved?)") \
            from None
    if profile.kind != "cpu":
        raise InvalidConfigError(f"{path}: target {profile.name} is a {profile.kind}: verify measures deployed graphs "
                                 "in ONNX Runtime on a CPU target (x86-vnni, arm-a76, a calibrated CPU profile)")
    complete = {t.number: t for t in res.trials if t.state == "complete" and t.feasible}
    if not complete:
        raise InvalidConfigError(f"{path}: the search has no complete, feasible trial to verify")
    front = [n for n in res.pareto if n in complete]
    chosen = sorted(front, key=lambda n: (-complete[n].metric, complete[n].latency_ms))[:top]
    best = res.best
    if best is not None and best not in chosen:
        chosen.append(best)
    any_config = next(iter(complete.values())).config
    fp32 = Candidate((f, LayerChoice(Precision.FP32, Precision.FP32)) for f in any_config)
    int8 = _uniform_int8(any_config, lambda c: profile.rule(c.weight, c.activation) is not None)
    candidates = {"fp32": fp32, "int8": int8, **{f"trial {n}": complete[n].config for n in chosen}}
    threads = threads or profile.threads or 1
    batch_size = batch_size or int(res.settings.get("batch_size") or 1)
    args = (task_ref, res.settings.get("quant"), candidates)
    kw = {"threads": threads, "batch_size": batch_size, "rounds": rounds,
          "fingerprint": res.settings.get("evaluator_key"), "progress": progress}
    start = time.perf_counter()
    if backend == "ray":
        from mpsearch.executors.ray_executor import run_on_resource

        measured, placement = run_on_resource(measure_candidates, args, kw, resource=profile.name,
                                              address=ray_address, cpus=threads)
    else:
        measured = measure_candidates(*args, **kw)
        placement = "this machine (--backend local)"
    configs = measured["configs"]
    ref = configs["fp32"]["latency_ms"]
    pred_fp32 = res.reference.get("fp32_latency_ms")
    trials = {}
    for n in chosen:
        m, rec = configs[f"trial {n}"], complete[n]
        trials[str(n)] = {
            **m,
            "measured_speedup": ref / m["latency_ms"],
            "predicted_latency_ms": rec.latency_ms,
            "predicted_speedup": pred_fp32 / rec.latency_ms if pred_fp32 else None,
            "predicted_metric": rec.metric,
            "best": n == best,
            "front": n in front,
        }
    references = {k: {**configs[k], "measured_speedup": ref / configs[k]["latency_ms"]} for k in ("fp32", "int8")}
    points = {int(n): (t["metric"], t["latency_ms"]) for n, t in trials.items()}
    verification = {
        "schema": VERIFY_SCHEMA,
        "where": {**measured["where"], "placement": placement, "backend": backend},
        "target": profile.name,
        "references": references,
        "trials": trials,
        "measured_front": measured_front(points),
        "seconds": time.perf_counter() - start,
    }
    res.verification = verification
    res.write(path)
    if path.parent.is_dir():
        from mpsearch.report.html import write_report

        try:
            write_report(path.parent)
        except Exception as e:  # noqa: BLE001 - the figures are in result.json already
            print(f"mpsearch: warning: report.html not rewritten ({type(e).__name__}: {e})", file=sys.stderr)
    return verification


def summary(v: Mapping[str, Any]) -> str:
    """The verification as a text table (stdout of `mpsearch verify`)."""
    from mpsearch.report.text import text_table

    w = v["where"]
    header = ["config", "pred ms", "meas ms", "pred x", "meas x", "sim metric", "ORT metric", "agree", "int8 k."]
    rows = []
    for k, r in v["references"].items():
        rows.append([k, "", f"{r['latency_ms']:.4g}", "", f"{r['measured_speedup']:.2f}x", f"{r['sim_metric']:.4f}",
                     f"{r['metric']:.4f}", f"{r['sim_agreement']:.3f}", str(r["int8_kernels"])])
    for n, t in v["trials"].items():
        ps = f"{t['predicted_speedup']:.2f}x" if t["predicted_speedup"] else "-"
        rows.append([f"trial {n}" + (" (best)" if t["best"] else ""), f"{t['predicted_latency_ms']:.4g}",
                     f"{t['latency_ms']:.4g}", ps, f"{t['measured_speedup']:.2f}x", f"{t['predicted_metric']:.4f}",
                     f"{t['metric']:.4f}", f"{t['sim_agreement']:.3f}", str(t["int8_kernels"])])
    return "\n".join([
        (f"measured on {w['host']} ({w['cpu']}; {', '.join(w['features']) or 'no int8 dot-product features'}), "
         f"{w['threads']} thread(s), batch {w['batch_size']}: {w['placement']}"),
        *text_table(header, rows, left=1),
        "measured front (ORT metric vs measured latency): " + ", ".join(f"trial {n}" for n in v["measured_front"]),
    ])
