"""The Python API: `mpsearch.search(...)`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import optuna

from hw_models import (
    Candidate,
    CostModel,
    HardwareProfile,
    LayerChoice,
    Precision,
)
from mpsearch.cache import cache_dir
from mpsearch.defaults import (
    COMPARE_OBJECTIVES,
    DEFAULT_BACKEND,
    DEFAULT_BATCH_SIZE,
    DEFAULT_EXPERIMENT,
    DEFAULT_RETRIES,
    DEFAULT_SAMPLER,
    DEFAULT_SEED,
    DEFAULT_STRATEGY,
    DEFAULT_TARGET,
    DEFAULT_TRIALS,
    DEFAULT_WORKER_THREADS,
    EXHAUSTIVE_LIMIT,
    OUT_ROOT,
    STUDY_FILE,
)
from mpsearch.engine.ilp import choice_costs, solve_allocation
from mpsearch.engine.loop import Budgets, Heartbeats, make_sampler, run_search
from mpsearch.engine.options import SearchOptions, parse_precisions
from mpsearch.engine.storage import (
    LAUNCH_ATTR,
    default_storage,
    make_storage,
    open_study,
    pick_study,
    redact,
    sqlalchemy_errors,
)
from mpsearch.engine.strategy import check_strategy
from mpsearch.engine.strategy import plan as make_plan
from mpsearch.errors import BudgetError, InvalidConfigError, OutputDirError
from mpsearch.outlock import OutputLock
from mpsearch.results.objectives import MB, reference_point
from mpsearch.results.records import SearchResult, layer_breakdown
from mpsearch.results.selection import drop_budget, is_proportion, n_eval_samples
from mpsearch.results.tracking import Tracker
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import ADAROUND_MAX_BITS, Evaluator, QuantSettings
from mpsearch.targets import resolve_target
from mpsearch.tasks import Task, load_task, task_ref, trusted_task
from search_spaces import SearchSpace, SpaceError


def prepare_out_dir(out_dir: str | os.PathLike | None, task: str, target: str) -> tuple[Path, bool]:
    """(the output directory, made writable, whether it was made now)."""
    if out_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(OUT_ROOT) / f"{_slug(task)}-{_slug(target)}-{stamp}"  # a name from a file is no path
    path = Path(out_dir)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to output directory {path}: {e.strerror or e}") from None
    return path, created


class Leftovers:
    """What a run that ends in an error would leave in OUT for nothing: the files it created
    (its new study, result.json) while no trial was scored or priced (none, or all failed), and
    OUT itself if it made it and it is empty then. A run that finished any trial keeps it all (a
    resume goes on from it); so does Ctrl-C, which says what it kept."""

    def __init__(self, out: Path, created: bool, files: Iterable[Path]) -> None:
        self.out, self.created = out, created
        self.files = [f for f in files if not f.exists()]  # those this run will create

    def remove(self, error: BaseException | None, result: SearchResult | None) -> None:
        if error is None or isinstance(error, KeyboardInterrupt):
            return
        if result is not None and any(t.state != "fail" for t in result.trials):
            return
        for f in self.files:
            f.unlink(missing_ok=True)
        if self.created:
            try:
                self.out.rmdir()  # only if empty
            except OSError:
                pass


STAGE_QUIET_S = 5.0  # a stage says what it does once it has run this long (seconds)


@contextmanager
def stage(progress: bool, name: str, detail: str = "") -> Iterator[None]:
    """A one-time stage of a search, on stderr: once it has run STAGE_QUIET_S, what it does (`name`
    and `detail`), and at its end how long it took. A stage with no bar of its own must not leave
    the user wondering whether the search hangs; a quick one (or one refused at once: bad input is
    one line) says nothing."""
    if not progress:
        yield
        return
    said = threading.Event()

    def say() -> None:
        said.set()
        print(f"mpsearch: {name}{detail} ...", file=sys.stderr, flush=True)

    timer = threading.Timer(STAGE_QUIET_S, say)
    timer.daemon = True
    t0 = time.perf_counter()
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
    if said.is_set():
        print(f"mpsearch: {name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def _slug(name: str) -> str:
    base = name.rsplit(":", 1)[-1] if ":" in name else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "task"


def search(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    n_trials: int = DEFAULT_TRIALS,
    sampler: str | optuna.samplers.BaseSampler = DEFAULT_SAMPLER,
    seed: int | None = DEFAULT_SEED,
    latency_budget_ms: float | None = None,
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
    size_budget_mb: float | None = None,
    memory_budget_mb: float | None = None,
    max_drop: float | str | None = None,
    ties: Iterable[Sequence[str]] = (),
    pins: Mapping[str, str | LayerChoice] | None = None,
    pin_first_last: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    resume: bool = False,
    n_seeds: int | None = None,
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
    over one is priced, never scored.
    max_drop: how far below the FP32 metric the best trial's metric may be, in metric points (0.01)
    or percent of the FP32 metric ("1%"); default: the evaluation set's own noise (one standard
    error of an accuracy-like FP32 metric, at least one sample; else 1% of it). The best trial
    (SearchResult.best) is the cheapest complete trial within every budget and this drop: the
    fastest when latency is an objective, else the cheapest in the first cost objective; if none is
    within the drop, the highest-metric one (mpsearch.results.selection). It does not change what is
    searched or scored.
    strategy: hybrid (default: sensitivity-guided ILP solutions first, then the sampler), optuna,
    ilp, or exhaustive (mpsearch.engine.strategy); n_seeds: the hybrid's ILP solutions (default a tenth
    of the trials).
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
        max_drop=max_drop, weight_precisions=weight_precisions, activation_precisions=activation_precisions,
        ties=ties, pins=pins or {}, pin_first_last=pin_first_last, batch_size=batch_size,
        quant=quant or QuantSettings(), early_stop=early_stop, evaluator_cache=evaluator_cache, n_seeds=n_seeds,
        exhaustive_limit=exhaustive_limit, backend=backend, ray_address=ray_address, workers=workers,
        worker_threads=worker_threads, retries=retries)
    objectives = options.objectives
    budgets = Budgets(latency_budget_ms, None if size_budget_mb is None else size_budget_mb * MB,
                      None if memory_budget_mb is None else memory_budget_mb * MB)
    sampler_obj = make_sampler(sampler, seed, n_trials)
    if "energy" in objectives and not profile.energy_pj_per_mac:
        raise InvalidConfigError(f"objective energy: target {profile.name} has no energy figures")
    if backend == "ray":
        from mpsearch.executors.ray_executor import preflight

        preflight(ray_address)
    if resume and out_dir is None and storage is None:
        raise InvalidConfigError("resume needs the output directory of the search to continue (or its storage)")
    if isinstance(task, str):
        with stage(progress, f"loading task {task}"):
            task_obj = load_task(task)
    else:
        task_obj = task
    task_name = task if isinstance(task, str) else task_obj.name
    n_samples = n_eval_samples(task_obj.eval_batches)
    drop = drop_budget(max_drop, task_obj.fp32_metric, task_obj.metric_name, n_samples,
                       is_proportion(task_obj.metric_fn, task_obj.metric_name, task_obj.fp32_metric))

    analysis, space, cost_model, fp32_act = setup_space(task_obj, profile, options)
    # the FP32 model's cost (None where the target cannot run fp32, e.g. an integer accelerator)
    fp32 = cost_model.price(Candidate.uniform(space.fqns, Precision.FP32, Precision.FP32))
    cheapest = check_budgets(space, cost_model, budgets)
    out, created = prepare_out_dir(out_dir, task_name, profile.name)
    lock = OutputLock(out, "mpsearch worker" if join else "mpsearch search").acquire()  # one writer per OUT
    storage_url = storage or default_storage(out)
    leftovers = Leftovers(out, created, [out / "result.json", *([] if storage else [out / STUDY_FILE])])
    result = error = None
    shared = storage is not None and strategy in ("hybrid", "optuna")
    identity = {"task": task_name, "target": profile.name, "space": space_signature(space),
                "objectives": list(objectives), "budgets": budgets.to_dict()}

    try:
        evaluator = make_evaluator(task_obj, analysis, options, progress)
    except BaseException as e:
        lock.release()
        leftovers.remove(e, None)
        raise
    # from here on, conversions are priced where the deployed graph has them (hw_models.graph)
    cost_model = CostModel(analysis.layers, profile, batch_size=batch_size, graph=evaluator.deploy_graph)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study, study_name, previous, store = open_study(
            storage_url, study_name, resume, sampler_obj, identity, objectives, task_obj.metric_name, space,
            default_name=f"{_slug(task_name)}-{_slug(profile.name)}", retries=retries if shared else None,
            launch=None if join else options.to_dict())
        if previous and isinstance(sampler, str) and seed is not None:
            # a sampler reseeded as at the start would propose what the first run already tried
            study.sampler = make_sampler(sampler, seed + len(previous), n_trials)
        if evaluator.settings.weight_rounding == "adaround":  # the costly weights up front, with a bar
            low = {c.weight for f in space.fqns for c in space.layer_choices(f)
                   if c.weight.is_int and c.weight.bits <= ADAROUND_MAX_BITS}
            if evaluator.precompute_weights(sorted(low, key=lambda p: p.bits), progress=progress):
                evaluator.save_cache()
        remaining = n_trials if join else (space.size if strategy == "exhaustive" else n_trials) - len(previous)
        plan = make_plan(strategy, space, cost_model, evaluator, budgets=budgets, objectives=objectives,
                         n_trials=max(remaining, 0), n_seeds=n_seeds, tried=[t.config for t in previous],
                         cache_dir=cache_dir("sensitivity") if evaluator_cache else None, progress=progress)
        settings = {
            "options": options.to_dict(),  # what `mpsearch worker` joins with (SearchOptions), versioned
            "n_trials": n_trials,
            "strategy": strategy,
            "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
            "seed": seed,
            "latency_budget_ms": latency_budget_ms,
            "size_budget_mb": size_budget_mb,
            "memory_budget_mb": memory_budget_mb,
            "max_drop": max_drop,
            "drop_budget": drop.to_dict(),
            "batch_size": batch_size,
            "quant": evaluator.settings.to_dict(),
            "early_stop": early_stop,
            "objectives": list(objectives),
            "hv_reference": reference_point(objectives, task_obj.fp32_metric, cost_upper_bounds(space, cost_model)),
            "storage": redact(storage_url),
            "study_name": study_name,
            "out_dir": str(out),
            "resumed_trials": len(previous),
            "setup_s": plan.setup_s,
            **plan.info,
            "backend": backend,
            # what `mpsearch verify` reloads and checks (mpsearch.deploy.verify)
            "task_ref": _task_ref(task),
            "target_ref": _target_ref(target, profile),
            "evaluator_key": evaluator.fingerprint(),
        }
        executor = None
        if backend == "ray":
            from mpsearch.executors.ray_executor import RayExecutor

            evaluator.save_cache()  # workers on this machine start from the driver's calibration
            executor = RayExecutor(task, evaluator.settings, address=ray_address, workers=workers,
                                   threads=worker_threads, retries=retries, cache=evaluator_cache, progress=progress)
            settings.update(workers=executor.workers, worker_threads=worker_threads, retries=retries,
                            ray_address=ray_address, worker_startup_s=executor.startup_s)
        result = SearchResult(
            task=task_name,
            target=profile.name,
            reference={
                "metric_name": task_obj.metric_name,
                "fp32_metric": task_obj.fp32_metric,
                "fp32_latency_ms": fp32.latency_ms if fp32.feasible else None,
                "fp32_weight_bytes": fp32.weight_bytes,
                "eval_samples": n_samples,
            },
            trials=list(previous),
            layers=tuple(analysis.layers),
            graph=evaluator.deploy_graph,
            settings=settings,
            space={
                **space.describe(),
                "min_latency_ms": cheapest,
                "unsupported": [u.to_dict() for u in analysis.unsupported],
            },
        )
        if progress:
            print(f"mpsearch: space of 10^{space.log10_size:.2f} candidates (10^{space.unreduced_log10_size:.2f} "
                  f"before ties and pins); strategy {strategy}"
                  + (f"; joining study {study_name!r} ({len(previous)} trials so far)" if join else
                     f"; resuming after {len(previous)} trials" if resume else ""), file=sys.stderr)
        tracker = start_tracking(result, study_name, space.size, mlflow_uri, experiment) if track else None
        try:
            result = run_search(result=result, space=space, cost_model=cost_model, evaluator=evaluator, study=study,
                              n_trials=max(remaining, 0), budgets=budgets, objectives=objectives, seeds=plan.seeds,
                              seeds_only=plan.seeds_only, out_dir=out, tracker=tracker, progress=progress,
                              early_stop=early_stop, executor=executor,
                              study_total=study.user_attrs[LAUNCH_ATTR]["n_trials"] if join else
                              n_trials if shared else None,
                              gather=shared, heartbeats=Heartbeats.of(store, study_name))
            if not join:
                result.reference.update(int8_reference(result, cost_model, evaluator, fp32_act))
                if tracker is not None:
                    tracker.log_reference(result.reference)
            finish_report(result, out, cost_model, tracker)
            return result
        finally:
            if executor is not None:
                executor.close()
    except BaseException as e:
        error = e
        raise
    finally:
        evaluator.save_cache()
        evaluator.close()
        lock.release()
        leftovers.remove(error, result)


def make_evaluator(task: Task, analysis, options: SearchOptions, progress: bool) -> Evaluator:
    """The evaluator of `task` (activation ranges on its calibration batches, FP32 outputs on its
    evaluation batches: from the evaluator cache when options.evaluator_cache and it has them)."""
    n_calib, n_eval = len(task.calib_batches), len(task.eval_batches)
    with stage(progress, "preparing the evaluator",
               f" (activation ranges on {n_calib} calibration batch{'es' if n_calib != 1 else ''}, FP32 outputs "
               f"on {n_eval} evaluation batch{'es' if n_eval != 1 else ''}; kept in the evaluator cache)"
               if options.evaluator_cache else ""):
        return Evaluator(task, analysis, options.quant,
                         cache_dir=cache_dir("evaluator") if options.evaluator_cache else None)


def start_tracking(result: SearchResult, run_name: str, space_size: float, mlflow_uri: str | None,
                   experiment: str) -> Tracker:
    """The search's MLflow parent run, with its settings as params; result.tracking is the
    tracker's own record from then on (its run id, or why tracking went off)."""
    tracker = Tracker(mlflow_uri, experiment)
    skip = ("storage", "setup_s", "hv_reference", "worker_startup_s", "options")  # options: the flat keys say it
    tracker.start(
        run_name=run_name,
        params={k: v for k, v in result.settings.items() if k not in skip}
        | {"task": result.task, "target": result.target, "space_size": space_size},
        tags={"mpsearch.task": result.task, "mpsearch.target": result.target},
        reference=result.reference,
    )
    result.tracking = tracker.tracking
    return tracker


def setup_space(task: Task, profile: HardwareProfile, options: SearchOptions):
    """(analysis, space, cost model, layers whose input stays fp32) of `task` on `profile`: the
    model's quantizable layers, each with the precision pairs the target runs among those the
    options allow, tied (shared weights, options.ties) and pinned (options.pins, pin_first_last);
    InvalidConfigError when no space is left or the exhaustive strategy cannot enumerate it. The
    layers left at fp32 (unsupported modules) are said on stderr."""
    analysis = analyze(task.model, task.example_input)
    if analysis.unsupported:
        names = ", ".join(f"{u.fqn} ({u.type_name}: {u.reason})" for u in analysis.unsupported[:5])
        more = f" and {len(analysis.unsupported) - 5} more" if len(analysis.unsupported) > 5 else ""
        print(f"mpsearch: left at fp32, not searched: {names}{more}", file=sys.stderr)
    fp32_act = [f for f, h in analysis.handles.items() if h.input_module is None]
    wp = parse_precisions(options.weight_precisions, "weight")
    ap = parse_precisions(options.activation_precisions, "activation")
    try:
        unreduced = SearchSpace(analysis.layers, profile, wp, ap, fp32_activation_layers=fp32_act)
        pin_map = _pins(unreduced, options.pins, options.pin_first_last)  # the pairs each pinned layer has
        space = SearchSpace(analysis.layers, profile, wp, ap, fp32_activation_layers=fp32_act,
                            ties=[*shared_weight_ties(analysis), *options.ties], pins=pin_map)
    except SpaceError as e:
        raise InvalidConfigError(str(e)) from None
    check_strategy(options.strategy, space, options.exhaustive_limit)
    return analysis, space, CostModel(analysis.layers, profile, batch_size=options.batch_size), fp32_act


def int8_reference(result: SearchResult, cost_model: CostModel, evaluator: Evaluator,
                   fp32_activation_layers: Sequence[str] = ()) -> dict[str, float | None]:
    """Uniform int8 as a reference beside FP32 (result.json's reference.int8_*): every layer at
    int8/int8 (a layer reading the model's input keeps fp32 activations, as `mpsearch profile
    --precision int8` prices it), its latency and weights on the target and its metric, a trial's
    when the search scored that configuration, else scored once now. None where the target cannot
    run it."""
    fp32_act = set(fp32_activation_layers)
    cand = Candidate((f, LayerChoice(Precision.INT8, Precision.FP32 if f in fp32_act else Precision.INT8))
                     for f in (x.fqn for x in cost_model.layers))
    cost = cost_model.price(cand)
    if not cost.feasible:
        return {"int8_metric": None, "int8_latency_ms": None, "int8_weight_bytes": None}
    scored = next((t.metric for t in result.trials if t.state == "complete" and t.config == cand), None)
    if scored is None:
        scored = evaluator.score(cand).metric
    return {"int8_metric": scored, "int8_latency_ms": cost.latency_ms, "int8_weight_bytes": cost.weight_bytes}


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


def _pins(space: SearchSpace, pins: Mapping[str, str | LayerChoice] | None, first_last: bool) -> dict:
    out = {}
    if first_last:
        for fqn in (space.fqns[0], space.fqns[-1]):
            pairs = space.layer_choices(fqn)
            want = LayerChoice(Precision.INT8, Precision.INT8)
            out[fqn] = want if want in pairs else max(pairs, key=lambda c: (c.weight.bits, c.activation.bits))
    for fqn, choice in (pins or {}).items():
        if isinstance(choice, str):
            w, _, a = choice.partition("/")
            choice = LayerChoice(parse_precisions([w], "pin")[0], parse_precisions([a or w], "pin")[0])
        out[fqn] = choice
    return out


def shared_weight_ties(analysis) -> list[list[str]]:
    """Layers that use one weight tensor (tied embeddings, a module called twice by two names)."""
    by_tensor: dict[int, list[str]] = {}
    for fqn, h in analysis.handles.items():
        by_tensor.setdefault(id(getattr(h.module, h.param)), []).append(fqn)
    return [g for g in by_tensor.values() if len(g) > 1]


def space_signature(space: SearchSpace) -> str:
    """A short hash of the space's layers and their precision pairs (resume refuses another)."""
    d = space.describe()
    blob = json.dumps({"layers": d["layers"], "ties": d["ties"], "pins": d["pins"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16] + f" (10^{space.log10_size:.2f} candidates, " \
        f"weights {','.join(d['weight_precisions'])}, activations {','.join(d['activation_precisions'])})"


def check_budgets(space: SearchSpace, cost_model: CostModel, budgets: Budgets) -> float:
    """Refuse budgets no configuration meets, alone or together; returns the cheapest latency (ms).

    Each budget is checked against its cost's lower bound over the space (every layer at its
    cheapest choice), and latency with size together by an integer program over the per-layer
    costs (transitions only add latency, so what it finds infeasible is)."""
    cheapest = _cheapest_latency_ms(space, cost_model)
    if budgets.latency_ms is not None and budgets.latency_ms < cheapest:
        raise BudgetError(
            f"latency budget {budgets.latency_ms:g} ms is below the cheapest configuration in "
            f"this space on {space.profile.name} ({cheapest:.4g} ms)"
        )
    costs = choice_costs(cost_model, {o.fqn: o.pairs for o in space.options})
    min_w = sum(min(c["weight_bytes"] for c in per.values()) for per in costs.values())
    min_act = max(min(c["act_bytes"] for c in per.values()) for per in costs.values())
    if budgets.size_bytes is not None and budgets.size_bytes < min_w:
        raise BudgetError(f"size budget {budgets.size_bytes / MB:g} MB is below the smallest weights in this "
                          f"space ({min_w / MB:.4g} MB)")
    if budgets.memory_bytes is not None and budgets.memory_bytes < min_w + min_act:
        raise BudgetError(f"memory budget {budgets.memory_bytes / MB:g} MB is below the smallest weights plus "
                          f"activations in this space ({(min_w + min_act) / MB:.4g} MB)")
    limits = budgets.ilp_limits()
    if len(limits) == 2:
        options = {o.fqn: list(o.pairs) for o in space.options}
        zero = {f: dict.fromkeys(pairs, 0.0) for f, pairs in options.items()}
        if solve_allocation(options, zero, costs, limits, ties=space.ties) is None:
            raise BudgetError(
                f"no configuration meets the latency budget of {budgets.latency_ms:g} ms and keeps weights "
                f"within {limits['weight_bytes'] / MB:g} MB together: raise one of them"
            )
    return cheapest


def cost_upper_bounds(space: SearchSpace, cost_model: CostModel) -> dict[str, float]:
    """Per cost objective, an upper bound over the space (the hypervolume's reference point; see
    CostModel.upper_bounds; activation memory: the peak with every layer at its widest pair)."""
    ub = cost_model.upper_bounds({o.fqn: o.pairs for o in space.options})
    widest = Candidate((o.fqn, max(o.pairs, key=lambda c: (c.activation.bits, c.weight.bits))) for o in space.options)
    return {"latency": ub["latency_s"] * 1e3, "weight_memory": ub["weight_bytes"], "bops": ub["bops"],
            "energy": ub["energy_j"] * 1e3, "activation_memory": float(cost_model.price(widest).peak_act_bytes)}


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


def _cheapest_latency_ms(space: SearchSpace, cost_model: CostModel) -> float:
    """A lower bound of the latency any candidate in the space reaches: the sum of each layer's
    cheapest choice (conversions between compute kinds only add to it)."""
    total = 0.0
    for fqn in space.fqns:
        total += min(cost_model.layer_cost(fqn, c).latency_s for c in space.layer_choices(fqn))
    return total * 1e3


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
