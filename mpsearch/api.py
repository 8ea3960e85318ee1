"""The Python API: `mpsearch.search(...)`."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sqlite3
import sys
from collections.abc import Iterable
from pathlib import Path

import optuna

from hw_models import (
    Candidate,
    CostModel,
    HardwareProfile,
    LayerChoice,
    Precision,
    UnknownProfileError,
    get_profile,
)
from hw_models.profile_file import ProfileFileError
from mpsearch.analysis import analyze
from mpsearch.cache import cache_dir
from mpsearch.controller import make_sampler, run_search
from mpsearch.errors import BudgetError, InvalidConfigError, OutputDirError, UnknownTargetError
from mpsearch.evaluator import ADAROUND_MAX_BITS, Evaluator, QuantSettings
from mpsearch.result import SearchResult
from mpsearch.tasks import Task, load_task
from mpsearch.tracking import DEFAULT_EXPERIMENT, Tracker
from search_spaces import SearchSpace, SpaceError

DEFAULT_TARGET = "x86-vnni"


def resolve_target(target: str | HardwareProfile) -> HardwareProfile:
    if isinstance(target, HardwareProfile):
        return target
    try:
        return get_profile(target)
    except UnknownProfileError as e:
        raise UnknownTargetError(str(e)) from None
    except ProfileFileError as e:
        raise InvalidConfigError(str(e)) from None


def parse_precisions(names: Iterable[str | Precision] | None, what: str) -> tuple[Precision, ...] | None:
    if names is None:
        return None
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        try:
            out.append(n if isinstance(n, Precision) else Precision.parse(n))
        except ValueError as e:
            raise InvalidConfigError(f"{what} precisions: {e}") from None
    if not out:
        raise InvalidConfigError(f"{what} precisions: the list is empty")
    return tuple(dict.fromkeys(out))


def prepare_out_dir(out_dir: str | os.PathLike | None, task: str, target: str) -> Path:
    if out_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path("mpsearch-out") / f"{_slug(task)}-{target}-{stamp}"
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to output directory {path}: {e.strerror or e}") from None
    return path


def _slug(name: str) -> str:
    base = name.rsplit(":", 1)[-1] if ":" in name else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "task"


def search(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    n_trials: int = 50,
    sampler: str | optuna.samplers.BaseSampler = "tpe",
    seed: int | None = 0,
    latency_budget_ms: float | None = None,
    weight_precisions: Iterable[str | Precision] | None = None,
    activation_precisions: Iterable[str | Precision] | None = None,
    out_dir: str | os.PathLike | None = None,
    mlflow_uri: str | None = None,
    track: bool = True,
    experiment: str = DEFAULT_EXPERIMENT,
    batch_size: int = 1,
    progress: bool = True,
    quant: QuantSettings | None = None,
    evaluator_cache: bool = True,
    early_stop: bool = False,
) -> SearchResult:
    """Search per-layer precisions for `task` on `target`; returns the SearchResult.

    task: a Task, a built-in task name ("digits"), or "package.module:function" /
    "path/to/file.py:function". Objectives: the task metric (max) and latency (min);
    latency_budget_ms makes latency a constraint too. Writes OUT/result.json after every
    trial and keeps the Optuna study in OUT/study.db. Tracks to MLflow unless track=False.
    quant: how candidates are quantized for scoring (QuantSettings defaults when None).
    evaluator_cache: keep the evaluator's candidate-independent work (activation ranges,
    quantized weights, FP32 reference outputs) in the user cache, so later searches of the
    same task, data and settings start without recomputing it.
    early_stop: multi-fidelity scoring: stop scoring a candidate part-way through the evaluation
    batches once it clearly cannot reach the metric of a trial at least as fast (recorded as
    "pruned"; see mpsearch.controller.run_search).
    """
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise InvalidConfigError(f"the number of trials must be a positive integer, got {n_trials!r}")
    if latency_budget_ms is not None and not latency_budget_ms > 0:
        raise InvalidConfigError(f"the latency budget must be positive, got {latency_budget_ms!r} ms")
    profile = resolve_target(target)
    wp = parse_precisions(weight_precisions, "weight")
    ap = parse_precisions(activation_precisions, "activation")
    sampler_obj = make_sampler(sampler, seed, n_trials)
    task_obj = load_task(task) if isinstance(task, str) else task
    task_name = task if isinstance(task, str) else task_obj.name

    analysis = analyze(task_obj.model, task_obj.example_input)
    if analysis.unsupported:
        names = ", ".join(f"{u.fqn} ({u.type_name}: {u.reason})" for u in analysis.unsupported[:5])
        more = f" and {len(analysis.unsupported) - 5} more" if len(analysis.unsupported) > 5 else ""
        print(f"mpsearch: left at fp32, not searched: {names}{more}", file=sys.stderr)
    fp32_act = [f for f, h in analysis.handles.items() if h.input_module is None]
    try:
        space = SearchSpace(analysis.layers, profile, wp, ap, fp32_activation_layers=fp32_act)
    except SpaceError as e:
        raise InvalidConfigError(str(e)) from None
    cost_model = CostModel(analysis.layers, profile, batch_size=batch_size)
    # the FP32 model's cost (None where the target cannot run fp32, e.g. an integer accelerator)
    fp32 = cost_model.price(Candidate.uniform(space.fqns, Precision.FP32, Precision.FP32))
    cheapest = _cheapest_latency_ms(space, cost_model)
    if latency_budget_ms is not None and latency_budget_ms < cheapest:
        raise BudgetError(
            f"latency budget {latency_budget_ms:g} ms is below the cheapest configuration in "
            f"this space on {profile.name} ({cheapest:.4g} ms)"
        )
    out = prepare_out_dir(out_dir, task_name, profile.name)

    evaluator = Evaluator(
        task_obj, analysis, quant, cache_dir=cache_dir("evaluator") if evaluator_cache else None
    )
    if evaluator.settings.weight_rounding == "adaround":  # the costly weights up front, with a bar
        low = {c.weight for f in space.fqns for c in space.layer_choices(f)
               if c.weight.is_int and c.weight.bits <= ADAROUND_MAX_BITS}
        if evaluator.precompute_weights(sorted(low, key=lambda p: p.bits), progress=progress):
            evaluator.save_cache()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    study_name = f"{_slug(task_name)}-{profile.name}-{stamp}"
    db_path = (out / "study.db").resolve()
    storage = f"sqlite:///{db_path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=sqlite_storage(db_path),
        sampler=sampler_obj,
        directions=["maximize", "minimize"],
    )
    settings = {
        "n_trials": n_trials,
        "sampler": sampler if isinstance(sampler, str) else type(sampler).__name__,
        "seed": seed,
        "latency_budget_ms": latency_budget_ms,
        "batch_size": batch_size,
        "quant": evaluator.settings.to_dict(),
        "early_stop": early_stop,
        "objectives": ["metric:max", "latency_ms:min"],
        "storage": storage,
        "study_name": study_name,
        "out_dir": str(out),
    }
    result = SearchResult(
        task=task_name,
        target=profile.name,
        reference={
            "metric_name": task_obj.metric_name,
            "fp32_metric": task_obj.fp32_metric,
            "fp32_latency_ms": fp32.latency_ms if fp32.feasible else None,
            "fp32_weight_bytes": fp32.weight_bytes,
        },
        trials=[],
        settings=settings,
        space={
            **space.describe(),
            "min_latency_ms": cheapest,
            "unsupported": [u.to_dict() for u in analysis.unsupported],
        },
    )
    tracker = None
    if track:
        tracker = Tracker(mlflow_uri, experiment)
        run_id = tracker.start(
            run_name=study_name,
            params={k: v for k, v in settings.items() if k not in ("storage",)}
            | {"task": task_name, "target": profile.name, "space_size": space.size},
            tags={"mpsearch.task": task_name, "mpsearch.target": profile.name},
        )
        result.tracking = {"mlflow_uri": tracker.uri, "experiment": experiment, "run_id": run_id}
    try:
        return run_search(
            result=result,
            space=space,
            cost_model=cost_model,
            evaluator=evaluator,
            study=study,
            n_trials=n_trials,
            latency_budget_ms=latency_budget_ms,
            out_dir=out,
            tracker=tracker,
            progress=progress,
            early_stop=early_stop,
        )
    finally:
        evaluator.save_cache()
        evaluator.close()


def profile_config(
    task: Task | str,
    target: str | HardwareProfile = DEFAULT_TARGET,
    *,
    precision: str = "fp32",
    config: str | os.PathLike | dict | Candidate | None = None,
    batch_size: int = 1,
) -> tuple[CostModel, Candidate]:
    """The cost model of `task` on `target` and the configuration to price: every layer at
    `precision` ("int8", or "weight/activation" such as "int4/int8"), or `config` (a Candidate,
    a {layer: {"weight", "activation"}} dict, or a JSON file holding one, or a result.json
    trial's "config")."""
    profile = resolve_target(target)
    task_obj = load_task(task) if isinstance(task, str) else task
    analysis = analyze(task_obj.model, task_obj.example_input)
    cost_model = CostModel(analysis.layers, profile, batch_size=batch_size)
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
            data = data["config"]
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


def sqlite_storage(path: Path) -> optuna.storages.RDBStorage:
    """An Optuna SQLite storage in write-ahead-log mode with synchronous=NORMAL.

    Each commit then costs no fsync (about 5x faster per trial here), yet a killed process
    loses nothing that was committed: only a power cut could lose the last transactions.
    """

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return optuna.storages.RDBStorage(f"sqlite:///{path}", engine_kwargs={"creator": connect})


def _cheapest_latency_ms(space: SearchSpace, cost_model: CostModel) -> float:
    """A lower bound of the latency any candidate in the space reaches: the sum of each layer's
    cheapest choice (conversions between compute kinds only add to it)."""
    total = 0.0
    for fqn in space.fqns:
        total += min(cost_model.layer_cost(fqn, c).latency_s for c in space.layer_choices(fqn))
    return total * 1e3
