"""The Python API: `mpsearch.search(...)`."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import optuna

from hw_models import (
    Candidate,
    CostModel,
    HardwareProfile,
    LayerChoice,
    Precision,
)
from mpsearch.defaults import (
    COMPARE_OBJECTIVES,
    DEFAULT_BACKEND,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EXPERIMENT,
    DEFAULT_RETRIES,
    DEFAULT_SAMPLER,
    DEFAULT_SEED,
    DEFAULT_SENSITIVITY,
    DEFAULT_STRATEGY,
    DEFAULT_TARGET,
    DEFAULT_TRIALS,
    DEFAULT_WORKER_THREADS,
    EXHAUSTIVE_LIMIT,
    STUDY_FILE,
)
from mpsearch.engine.loop import Heartbeats, make_sampler, run_search
from mpsearch.engine.options import SearchOptions, parse_precisions
from mpsearch.engine.setup import (
    Leftovers,
    Setup,
    int8_reference,
    make_evaluator,
    new_result,
    precompute_low_bit_weights,
    prepare_out_dir,
    start_tracking,
)
from mpsearch.engine.storage import (
    LAUNCH_ATTR,
    default_storage,
    make_storage,
    open_study,
    pick_study,
    redact,
    sqlalchemy_errors,
)
from mpsearch.errors import InvalidConfigError
from mpsearch.outlock import OutputLock
from mpsearch.report.text import space_line
from mpsearch.results.records import SearchResult, layer_breakdown
from mpsearch.results.tracking import Tracker
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.targets import resolve_target
from mpsearch.tasks import Task, load_task, task_ref, trusted_task


def search(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    n_trials: int = DEFAULT_TRIALS,
    sampler: str | optuna.samplers.BaseSampler = DEFAULT_SAMPLER,
    seed: int | None = DEFAULT_SEED,
    latency_budget_ms: float | str | None = None,
    weight_precisions: Iterable[str | Precision] | None = None,
    activation_precisions: Iterable[str | Precision] | None = None,
    out_dir: str | os.PathLike | None = None,
    mlflow_uri: str | None = None,
    track: bool = True,
    experiment: str = DEFAULT_EXPERIMENT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    quant: QuantSettings | None = None,
    evaluator_cache: bool = True,
    early_stop: bool = False,
    *,
    strategy: str = DEFAULT_STRATEGY,
    objectives: str | Sequence[str] | None = None,
    size_budget_mb: float | str | None = None,
    memory_budget_mb: float | str | None = None,
    weight_bytes: str = "with-scales",
    max_drop: float | str | None = None,
    ties: Iterable[Sequence[str]] = (),
    pins: Mapping[str, str | LayerChoice] | None = None,
    pin_first_last: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    resume: bool = False,
    n_seeds: int | None = None,
    patience: int | None = None,
    sensitivity: str = DEFAULT_SENSITIVITY,
    exhaustive_limit: int = EXHAUSTIVE_LIMIT,
    backend: str = DEFAULT_BACKEND,
    ray_address: str | None = None,
    workers: int | None = None,
    worker_threads: int = DEFAULT_WORKER_THREADS,
    retries: int = DEFAULT_RETRIES,
    join: bool = False,
) -> SearchResult:
    """Search per-layer precisions for `task` on `target`; returns the SearchResult.

    task: a Task, a built-in task name ("digits"), or "package.module:function" /
    "path/to/file.py:function".
    objectives: "metric" and any of latency, weight_memory, activation_memory, bops, energy
    (mpsearch.results.objectives; default metric,latency). Budgets (latency_budget_ms, size_budget_mb:
    weight memory, memory_budget_mb: weights plus peak activations) are constraints: a candidate
    over one is priced, never scored. Each is a number (ms, MB) or relative to the target's uniform
    FP32 or int8 configuration: "0.5xfp32", "75%int8" (mpsearch.engine.budgets; settings.budgets_given
    keeps the form, the flat settings the number). weight_bytes: "with-scales" (default: the integer
    weights' per-channel fp32 scales counted, as the exported graph stores them) or "payload" (the
    packed values alone), for the size and memory budgets and the weight_memory objective.
    max_drop: how far below the FP32 metric the best trial's metric may be, in metric points (0.01)
    or percent of the FP32 metric ("1%"); default: the evaluation set's own noise (one standard
    error of an accuracy-like FP32 metric, at least one sample; else 1% of it). Without a budget,
    or with max_drop given, the best trial
    (SearchResult.best) is the cheapest complete trial within every budget and this drop: the
    fastest when latency is an objective, else the cheapest in the first cost objective; if none is
    within the drop, the highest-metric one (mpsearch.results.selection). It does not change what is
    searched or scored.
    strategy: hybrid (default: sensitivity-guided ILP solutions first, then the sampler), optuna,
    ilp, or exhaustive (mpsearch.engine.strategy); n_seeds: the hybrid's ILP solutions (default a tenth
    of the trials). With a budget and no max_drop, best is the most accurate configuration within
    the budgets (mpsearch.results.selection), the ILP solutions lie near the budget, and the hybrid
    then refines around its best trial and stops once `patience` trials (default a fifth of the
    trials, at least 10; 0: never) found nothing better (mpsearch.engine.refine). sensitivity: how
    the ilp and hybrid strategies measure each layer's sensitivity, "fisher" (default: a
    second-order estimate) or "exact" (mpsearch.engine.sensitivity).
    ties: groups of layer names that must share a precision pair (layers sharing a weight tensor
    are tied automatically); pins: {layer: "weight/activation"}; pin_first_last: the first and
    last layers at int8/int8 (their widest pair where the target has no int8).
    Writes OUT/result.json after every trial; the Optuna study lives in `storage` (any Optuna
    storage URL; default the journal file OUT/study.log) under `study_name`. resume=True continues that
    study (the only one in the storage when study_name is None) up to n_trials trials in all,
    refusing one whose task, target, space or objectives differ. A `storage` given here may be
    shared: other processes (`mpsearch worker`, join_study) run trials of the same study, the
    search stops when the study holds n_trials, and result.json gathers every process's trials
    (RDB storages keep heartbeats: a process that dies mid-trial has that trial failed and, up to
    `retries` times, run again by another). join=True: this process is such a worker (see
    join_study). Tracks to MLflow unless track=False.
    backend: "local" (score in this process) or "ray": score on `workers` Ray actors of
    `worker_threads` torch threads each (default: one per CPU of the cluster), on a local Ray
    instance or the cluster at `ray_address` ("auto" or HOST:PORT); a trial whose worker dies is
    run again up to `retries` times, then recorded as failed (mpsearch.executors.ray_executor).
    quant: how candidates are quantized for scoring (QuantSettings defaults when None).
    evaluator_cache: keep the evaluator's candidate-independent work (activation ranges,
    quantized weights, FP32 reference outputs) and the layer sensitivities in the user cache.
    early_stop: multi-fidelity scoring: stop scoring a candidate part-way through the evaluation
    batches once it clearly cannot reach the metric of a trial no costlier (recorded as
    "pruned"; see mpsearch.engine.loop.run_search).
    """
    profile = resolve_target(target)
    options = SearchOptions(  # every option checked here, before any work
        task=_task_ref(task), target=_target_ref(target, profile), n_trials=n_trials, strategy=strategy,
        sampler=sampler if isinstance(sampler, str) else DEFAULT_SAMPLER, seed=seed, objectives=objectives,
        latency_budget_ms=latency_budget_ms, size_budget_mb=size_budget_mb, memory_budget_mb=memory_budget_mb,
        weight_bytes=weight_bytes, max_drop=max_drop, weight_precisions=weight_precisions,
        activation_precisions=activation_precisions, ties=ties, pins=pins or {}, pin_first_last=pin_first_last,
        batch_size=batch_size,
        quant=quant or QuantSettings(), early_stop=early_stop, evaluator_cache=evaluator_cache, n_seeds=n_seeds,
        patience=patience, sensitivity=sensitivity, exhaustive_limit=exhaustive_limit, backend=backend, ray_address=ray_address, workers=workers,
        worker_threads=worker_threads, retries=retries)
    sampler_obj = make_sampler(sampler, seed, n_trials)
    if resume and out_dir is None and storage is None:
        raise InvalidConfigError("resume needs the output directory of the search to continue (or its storage)")
    setup = Setup.of(task, profile, options, progress)
    out, created = prepare_out_dir(out_dir, setup.task_name, profile.name)
    lock = OutputLock(out, "mpsearch worker" if join else "mpsearch search").acquire()  # one writer per OUT
    storage_url = storage or default_storage(out)
    leftovers = Leftovers(out, created, [out / "result.json", *([] if storage else [out / STUDY_FILE])])
    shared = storage is not None and strategy in ("hybrid", "optuna")
    result = error = evaluator = executor = None
    try:
        evaluator = make_evaluator(setup.task, setup.analysis, options, progress)
        cost_model = setup.priced_on(evaluator.deploy_graph)
        setup.resolve_budgets(cost_model)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, study_name, previous, store = open_study(
            storage_url, study_name, resume, sampler_obj, setup.identity(), options.objectives,
            setup.task.metric_name, setup.space, default_name=setup.study_name(),
            retries=retries if shared else None, launch=None if join else options.to_dict())
        if previous and isinstance(sampler, str) and seed is not None:
            # a sampler reseeded as at the start would propose what the first run already tried
            study.sampler = make_sampler(sampler, seed + len(previous), n_trials)
        precompute_low_bit_weights(evaluator, setup.space, progress)
        plan = setup.plan(cost_model, evaluator, previous, join, progress)
        result = new_result(setup, evaluator, cost_model, plan, out=out, storage=redact(storage_url),
                            study_name=study_name, previous=previous,
                            sampler_name=sampler if isinstance(sampler, str) else type(sampler).__name__)
        if backend == "ray":
            executor = _ray_executor(task, evaluator, options, progress, result.settings)
        if progress:
            print(space_line(setup.space, strategy, study_name, len(previous), join, resume), file=sys.stderr)
        tracker = start_tracking(result, study_name, setup.space.size, mlflow_uri, experiment) if track else None
        result = run_search(result=result, space=setup.space, cost_model=cost_model, evaluator=evaluator,
                            study=study, n_trials=setup.remaining(len(previous), join), budgets=setup.budgets,
                            objectives=options.objectives, seeds=plan.seeds, seeds_only=plan.seeds_only,
                            out_dir=out, tracker=tracker, progress=progress, early_stop=early_stop,
                            executor=executor, gather=shared, heartbeats=Heartbeats.of(store, study_name),
                            refiner=plan.refiner,
                            study_total=study.user_attrs[LAUNCH_ATTR]["n_trials"] if join else
                            n_trials if shared else None)
        if not join:
            result.reference.update(int8_reference(result, cost_model, evaluator, setup.fp32_act))
            if tracker is not None:
                tracker.log_reference(result.reference)
        finish_report(result, out, cost_model, tracker)
        return result
    except BaseException as e:
        error = e
        raise
    finally:
        if executor is not None:
            executor.close()
        if evaluator is not None:
            evaluator.save_cache()
            evaluator.close()
        lock.release()
        leftovers.remove(error, result)


def _ray_executor(task, evaluator: Evaluator, options: SearchOptions, progress: bool, settings: dict):
    """Ray actors scoring with the driver's evaluator settings; their figures go into `settings`."""
    from mpsearch.executors.ray_executor import RayExecutor

    evaluator.save_cache()  # workers on this machine start from the driver's calibration
    executor = RayExecutor(task, evaluator.settings, address=options.ray_address, workers=options.workers,
                           threads=options.worker_threads, retries=options.retries, cache=options.evaluator_cache,
                           progress=progress)
    settings.update(workers=executor.workers, worker_threads=options.worker_threads, retries=options.retries,
                    ray_address=options.ray_address, worker_startup_s=executor.startup_s)
    return executor


def _task_ref(task) -> str | None:
    """A task reference another process can load (mpsearch.tasks.task_ref); None for a Task object."""
    return task_ref(task) if isinstance(task, str) else None


def _target_ref(target, profile) -> str:
    """A target reference another process can resolve: a profile file made absolute, else its name."""
    if isinstance(target, str) and target.endswith(".toml") and Path(target).is_file():
        return str(Path(target).resolve())
    return target if isinstance(target, str) else profile.name


def join_study(storage: str, study_name: str | None = None, *, out_dir: str | os.PathLike | None = None,
               max_trials: int | None = None, progress: bool = True,
               retries: int = DEFAULT_RETRIES, task: str | None = None) -> SearchResult:
    """Work on a study another process created with `search(..., storage=...)` (`mpsearch
    worker`): the same task, target and space, read from the study; trials until the study holds
    the search's n_trials (or this process ran max_trials). Each worker's sampler draws its own
    random stream (seed None). Writes OUT/result.json with every trial of the study; no MLflow
    (the search that created the study logs every trial).

    task: the study's task, named by the user. A study whose task is a file or module (user code)
    is refused without it: anyone who can write the storage could otherwise run code on every
    worker (mpsearch.tasks.trusted_task); a built-in task needs none. The worker says on stderr
    which task it runs."""
    if max_trials is not None and (isinstance(max_trials, bool) or not isinstance(max_trials, int) or max_trials < 1):
        raise InvalidConfigError(f"the number of trials must be a positive integer, got {max_trials!r}")
    try:
        store = make_storage(storage)
        study_name = pick_study(store, study_name, "no study yet: start one with mpsearch search ... --storage URL")
    except (ImportError, ValueError, sqlalchemy_errors()) as e:
        raise InvalidConfigError(f"cannot open the study storage {redact(storage)}: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}") from None
    launch = optuna.load_study(study_name=study_name, storage=store).user_attrs.get(LAUNCH_ATTR)
    if not launch or not launch.get("task"):
        raise InvalidConfigError(f"study {study_name!r} has no search options a worker can use (it was not created "
                                 "by mpsearch search with a task name or reference)")
    options = SearchOptions.from_dict(launch, f"study {study_name!r}")
    task = trusted_task(options.task, task, f"study {study_name!r}", same=True)
    print(f"mpsearch worker: study {study_name!r}: task {task}, target {options.target}", file=sys.stderr)
    kw = {f: getattr(options, f) for f in WORKER_OPTIONS}  # search() reads the study's n_trials again
    return search(task, **kw, n_trials=max_trials or options.n_trials, seed=None, storage=storage,
                  study_name=study_name, resume=True, join=True, track=False, out_dir=out_dir, progress=progress,
                  strategy="optuna", retries=retries)


# the study's options a worker searches with; its own: the trials it runs, the sampler's random
# stream, where it writes, the strategy (the sampler: the study's seeds are the creator's) and retries
WORKER_OPTIONS = ("target", "sampler", "objectives", "latency_budget_ms", "size_budget_mb", "memory_budget_mb",
                  "weight_bytes",
                  "max_drop", "weight_precisions", "activation_precisions", "ties", "pins", "pin_first_last",
                  "batch_size", "quant", "early_stop", "evaluator_cache")


def finish_report(result: SearchResult, out: Path, cost_model: CostModel | None, tracker: Tracker | None,
                  extra: Sequence[Path] = ()) -> None:
    """The best trial's per-layer latencies into result.json, its configuration to
    OUT/best_config.json (mpsearch.deploy.export), OUT/report.html, and all of them (with `extra` files)
    as artifacts of the MLflow parent run."""
    from mpsearch.deploy.export import export_config, write_config
    from mpsearch.report.html import write_report

    files = []
    if result.best is not None:
        if cost_model is not None:
            result.settings["breakdown"] = layer_breakdown(cost_model, result.trial(result.best))
            result.write(out / "result.json")
        write_config(export_config(out), out / "best_config.json")
        files.append(out / "best_config.json")
    files += write_report(out)
    if tracker is not None:
        tracker.log_files([out / "result.json", *files, *extra])


def profile_config(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    *,
    precision: str = "fp32",
    config: str | os.PathLike | dict | Candidate | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[CostModel, Candidate]:
    """The cost model of `task` on `target` and the configuration to price: every layer at
    `precision` ("int8", or "weight/activation" such as "int4/int8"), or `config` (a Candidate,
    a {layer: {"weight", "activation"}} dict, or a JSON file holding one, or a result.json
    trial's "config")."""
    profile = resolve_target(target)
    task_obj = load_task(task) if isinstance(task, str) else task
    analysis = analyze(task_obj.model, task_obj.example_input)
    from mpsearch.scoring.onnx_graph import deploy_graph_of

    cost_model = CostModel(analysis.layers, profile, batch_size=batch_size, graph=deploy_graph_of(task_obj, analysis))
    if config is None:
        w, _, a = precision.partition("/")
        wp = parse_precisions([w], "weight")[0]
        ap = parse_precisions([a or w], "activation")[0]
        fp32_act = {f for f, h in analysis.handles.items() if h.input_module is None}
        candidate = Candidate(
            (f, LayerChoice(wp, Precision.FP32 if f in fp32_act else ap)) for f in analysis.fqns
        )
        return cost_model, candidate
    return cost_model, _load_config(config, analysis.fqns)


def _load_config(config, fqns) -> Candidate:
    if isinstance(config, Candidate):
        cand = config
    else:
        data = config
        if not isinstance(config, dict):
            try:
                data = json.loads(Path(config).read_text())
            except OSError as e:
                raise InvalidConfigError(f"cannot read config {config}: {e.strerror or e}") from None
            except json.JSONDecodeError as e:
                raise InvalidConfigError(f"config {config} is not valid JSON ({e})") from None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            data = data["config"]  # a trial of result.json
        elif isinstance(data, dict) and "schema" in data:  # a file of `mpsearch export`
            from mpsearch.deploy.export import read_config

            data = read_config(data)["layers"]
        try:
            cand = Candidate.from_dict(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise InvalidConfigError(f"config {config}: expected {{layer: {{weight, activation}}}} ({e})") from None
    missing = [f for f in fqns if f not in cand]
    if missing:
        raise InvalidConfigError(f"config has no precision for layer {missing[0]}"
                                 + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [f for f in cand if f not in set(fqns)]
    if extra:
        raise InvalidConfigError(f"config names layer {extra[0]}, which the model does not have")
    return Candidate((f, cand[f]) for f in fqns)


def compare(
    task: Task | str,
    targets: str | Sequence[str | HardwareProfile],
    n_trials: int = DEFAULT_TRIALS,
    *,
    objectives: str | Sequence[str] | None = COMPARE_OBJECTIVES,
    latency_budget_ms: float | Sequence[float] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    **search_options,
):
    """One search, priced on every target (mpsearch.compare): returns a Comparison and writes
    OUT/compare.json beside OUT/result.json.

    targets: names or profile files, comma-separated or a list (the first one's space is
    searched: its precisions; a configuration another target cannot run is off that target's
    front only). objectives: the search's (default metric,bops: no target's own latency).
    latency_budget_ms: budgets in ms added to each target's table (not search constraints).
    search_options: any other keyword of `search` (n_trials, sampler, seed, strategy, out_dir,
    mlflow_uri, track, backend, ...).
    """
    names = [t.strip() for t in targets.split(",") if t.strip()] if isinstance(targets, str) else list(targets)
    if not names:
        raise InvalidConfigError("compare needs at least one target")
    profiles = [resolve_target(t) for t in names]
    seen = [p.name for p in profiles]
    if len(set(seen)) != len(seen):
        raise InvalidConfigError(f"a target is listed twice in {','.join(seen)}")
    budgets = [] if latency_budget_ms is None else (
        [latency_budget_ms] if isinstance(latency_budget_ms, int | float) else list(latency_budget_ms))
    for b in budgets:
        if isinstance(b, bool) or not isinstance(b, int | float) or not (b > 0 and math.isfinite(b)):
            raise InvalidConfigError(f"latency budgets must be positive, finite numbers of ms, got {b!r}")
    given = search_options.get("out_dir")  # held through the search and the writes after it
    if given is None:
        return _compare(task, names, profiles, n_trials, objectives, batch_size, budgets, search_options)
    out, created = prepare_out_dir(given, "", "")
    leftovers = Leftovers(out, created, ())  # the search inside removes its own
    try:
        with OutputLock(out, "mpsearch compare"):
            return _compare(task, names, profiles, n_trials, objectives, batch_size, budgets, search_options)
    except BaseException as e:
        leftovers.remove(e, None)
        raise


def _compare(task, names, profiles, n_trials, objectives, batch_size, budgets, search_options):
    from mpsearch.results.compare import price_on_targets

    result = search(task, names[0], n_trials, objectives=objectives, batch_size=batch_size, **search_options)
    cmp = price_on_targets(result, result.layers, profiles, batch_size=batch_size, latency_budgets_ms=budgets,
                           graph=result.graph)
    out = Path(result.settings["out_dir"])
    cmp.write(out / "compare.json")
    tracker = Tracker.resume(result.tracking)
    if tracker is not None:  # one child run per target under the search's run
        for name in cmp.targets:
            pt = cmp.per_target[name]
            metrics = {"pareto_size": len(pt["pareto"]), "fp32_latency_ms": pt["reference"]["fp32_latency_ms"],
                       "int8_latency_ms": pt["reference"]["int8_latency_ms"]}
            best = cmp.view(name).best
            if best is not None:
                b = cmp.view(name).trial(best)
                metrics |= {"best_trial": best, "best_metric": b.metric, "best_latency_ms": b.latency_ms,
                            "best_speedup_fp32": (pt["reference"]["fp32_latency_ms"] / b.latency_ms
                                                  if pt["reference"]["fp32_latency_ms"] else None)}
            for r in pt["table"]:
                key = re.sub(r"[^A-Za-z0-9_]+", "_", r["budget"]).strip("_")
                metrics |= {f"best_metric_{key}": r["metric"], f"latency_ms_{key}": r["latency_ms"],
                            f"speedup_fp32_{key}": r["speedup_fp32"], f"speedup_int8_{key}": r["speedup_int8"]}
            tracker.log_target(name, metrics, {"target": name, "task": result.task})
    finish_report(result, out, None, tracker, extra=[out / "compare.json"])
    return cmp
