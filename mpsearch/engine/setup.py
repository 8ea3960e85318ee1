"""Setting a search up: its target's space and budgets, the evaluator, the output directory and
the SearchResult its trial loop fills.

`Setup.of` does every check that needs the model but no study: the task loaded, the space of
precision pairs each layer may take on the target (tied and pinned), the budgets checked against
the cheapest configuration, the drop budget from the evaluation set. `new_result` starts the
SearchResult (reference figures, settings, space) the loop (mpsearch.engine.loop) fills and
writes after every trial. The output directory: `prepare_out_dir` makes it, `Leftovers` removes
what a run that failed before any trial would leave there.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from hw_models import Candidate, Cost, CostModel, HardwareProfile, LayerChoice, Precision
from hw_models.graph import DeployGraph
from mpsearch.cache import cache_dir
from mpsearch.defaults import OUT_ROOT
from mpsearch.engine.budgets import Budgets, Relative, reference_candidate, resolve
from mpsearch.engine.ilp import choice_costs, solve_allocation
from mpsearch.engine.options import SearchOptions, parse_precisions
from mpsearch.engine.strategy import Plan, check_strategy
from mpsearch.engine.strategy import plan as make_plan
from mpsearch.errors import BudgetError, InvalidConfigError, OutputDirError
from mpsearch.metrics import is_proportion, n_eval_samples
from mpsearch.results.objectives import MB, reference_point
from mpsearch.results.records import SearchResult
from mpsearch.results.selection import DropBudget, drop_budget
from mpsearch.results.tracking import Tracker
from mpsearch.scoring.analysis import ModelAnalysis, analyze
from mpsearch.scoring.evaluator import ADAROUND_MAX_BITS, Evaluator
from mpsearch.tasks import Task, load_task
from search_spaces import SearchSpace, SpaceError


@dataclass
class Setup:
    """A search's task on its target before any study or scoring (Setup.of)."""

    task: Task
    task_name: str
    profile: HardwareProfile
    options: SearchOptions
    analysis: ModelAnalysis
    space: SearchSpace
    cost_model: CostModel  # without the deployed graph's conversions (priced_on adds them)
    fp32_act: list[str]  # layers whose input stays fp32 (they read the model's input)
    budgets: Budgets
    drop: DropBudget
    fp32: Cost  # the FP32 model's cost (infeasible where the target cannot run fp32)
    cheapest_ms: float

    @classmethod
    def of(cls, task: Task | str, profile: HardwareProfile, options: SearchOptions, progress: bool) -> Setup:
        """The task loaded, its space on `profile` set up and the budgets checked against it:
        InvalidConfigError or BudgetError before any output is written."""
        if options.backend == "ray":
            from mpsearch.executors.ray_executor import preflight

            preflight(options.ray_address)
        if "energy" in options.objectives and not profile.energy_pj_per_mac:
            raise InvalidConfigError(f"objective energy: target {profile.name} has no energy figures")
        if isinstance(task, str):
            with stage(progress, f"loading task {task}"):
                task_obj = load_task(task)
        else:
            task_obj = task
        drop = drop_budget(options.max_drop, task_obj.fp32_metric, task_obj.metric_name,
                           n_eval_samples(task_obj.eval_batches),
                           is_proportion(task_obj.metric_fn, task_obj.metric_name, task_obj.fp32_metric))
        if options.max_drop is None and any(v is not None for v in options.budgets_given().values()):
            drop = dataclasses.replace(drop, mode="most_accurate")  # the best that fits (results.selection)
        analysis, space, cost_model, fp32_act = setup_space(task_obj, profile, options)
        # numbers are checked now; a relative budget once its reference is priced (resolve_budgets)
        budgets = resolve({k: v for k, v in options.budgets_given().items() if not isinstance(v, Relative)},
                          cost_model)
        fp32 = cost_model.price(Candidate.uniform(space.fqns, Precision.FP32, Precision.FP32))
        cheapest = check_budgets(space, cost_model, budgets)
        return cls(task_obj, task if isinstance(task, str) else task_obj.name, profile, options, analysis, space,
                   cost_model, fp32_act, budgets, drop, fp32, cheapest)

    def priced_on(self, graph: DeployGraph) -> CostModel:
        """The cost model that prices conversions where the deployed graph has them (hw_models.graph)."""
        return CostModel(self.analysis.layers, self.profile, batch_size=self.options.batch_size, graph=graph,
                         weight_counting=self.options.weight_bytes)

    def resolve_budgets(self, cost_model: CostModel) -> Budgets:
        """The budgets as numbers, a relative one ("0.5xfp32") priced by `cost_model` against its
        reference as result.json reports it (engine.budgets); BudgetError when none can meet them."""
        given = self.options.budgets_given()
        if any(isinstance(v, Relative) for v in given.values()):
            self.budgets = resolve(given, cost_model, self.fp32_act)
            check_budgets(self.space, self.cost_model, self.budgets)
        return self.budgets

    def identity(self) -> dict:
        """What a resumed study must match: task, target, space, objectives and budgets."""
        return {"task": self.task_name, "target": self.profile.name, "space": space_signature(self.space),
                "objectives": list(self.options.objectives), "budgets": self.budgets.to_dict()}

    def remaining(self, n_previous: int, join: bool) -> int:
        """The trials this process runs: a worker (join) up to its own n_trials; a search (or a
        resume) up to n_trials in all, or the whole space when it enumerates it."""
        o = self.options
        return max((o.n_trials if join else (self.space.size if o.strategy == "exhaustive" else o.n_trials)
                    - n_previous), 0)

    def plan(self, cost_model: CostModel, evaluator: Evaluator, previous: Sequence, join: bool,
             progress: bool) -> Plan:
        """What the strategy tries before (or instead of) the sampler (mpsearch.engine.strategy)."""
        o = self.options
        return make_plan(o.strategy, self.space, cost_model, evaluator, budgets=self.budgets,
                         objectives=o.objectives, n_trials=self.remaining(len(previous), join), n_seeds=o.n_seeds,
                         tried=[t.config for t in previous], progress=progress,
                         cache_dir=cache_dir("sensitivity") if o.evaluator_cache else None, drop=self.drop,
                         patience=o.patience, sensitivity=o.sensitivity)

    def study_name(self) -> str:
        return f"{slug(self.task_name)}-{slug(self.profile.name)}"


def new_result(setup: Setup, evaluator: Evaluator, cost_model: CostModel, plan: Plan, *, sampler_name: str,
               storage: str, study_name: str, out: Path, previous: Sequence) -> SearchResult:
    """The SearchResult the trial loop fills: FP32 reference figures, the settings (the options,
    versioned, and the flat keys MLflow logs as params), the space, and the trials a resumed study
    already holds."""
    o, task, fp32, b = setup.options, setup.task, setup.fp32, setup.budgets
    given = {k: str(v) for k, v in o.budgets_given().items() if isinstance(v, Relative)}  # as typed: "75%int8"
    settings = {
        "options": o.to_dict(),  # what `mpsearch worker` joins with (SearchOptions), versioned
        "n_trials": o.n_trials, "strategy": o.strategy, "sampler": sampler_name, "seed": o.seed,
        # the numbers the loop checks: a number as given, a relative budget as resolved
        "latency_budget_ms": b.latency_ms,
        "size_budget_mb": o.size_budget_mb if "size" not in given else b.size_bytes / MB,
        "memory_budget_mb": o.memory_budget_mb if "memory" not in given else b.memory_bytes / MB,
        "weight_bytes": o.weight_bytes,
        **({"budgets_given": given} if given else {}),
        "max_drop": o.max_drop, "drop_budget": setup.drop.to_dict(),
        "batch_size": o.batch_size, "quant": evaluator.settings.to_dict(), "early_stop": o.early_stop,
        "objectives": list(o.objectives),
        "hv_reference": reference_point(o.objectives, task.fp32_metric, cost_upper_bounds(setup.space, cost_model)),
        "storage": storage, "study_name": study_name, "out_dir": str(out), "resumed_trials": len(previous),
        "setup_s": plan.setup_s, **plan.info, "backend": o.backend,
        # what `mpsearch verify` reloads and checks (mpsearch.deploy.verify)
        "task_ref": o.task, "target_ref": o.target, "evaluator_key": evaluator.fingerprint(),
    }
    reference = {"metric_name": task.metric_name, "fp32_metric": task.fp32_metric,
                 "fp32_latency_ms": fp32.latency_ms if fp32.feasible else None,
                 "fp32_weight_bytes": fp32.weight_bytes, "eval_samples": n_eval_samples(task.eval_batches)}
    space = {**setup.space.describe(), "min_latency_ms": setup.cheapest_ms,
             "unsupported": [u.to_dict() for u in setup.analysis.unsupported]}
    return SearchResult(task=setup.task_name, target=setup.profile.name, reference=reference, trials=list(previous),
                        layers=tuple(setup.analysis.layers), graph=evaluator.deploy_graph, settings=settings,
                        space=space)


def precompute_low_bit_weights(evaluator: Evaluator, space: SearchSpace, progress: bool) -> None:
    """With AdaRound, the costly low-bit weights up front (with a bar), into the evaluator cache."""
    if evaluator.settings.weight_rounding != "adaround":
        return
    low = {c.weight for f in space.fqns for c in space.layer_choices(f)
           if c.weight.is_int and c.weight.bits <= ADAROUND_MAX_BITS}
    if evaluator.precompute_weights(sorted(low, key=lambda p: p.bits), progress=progress):
        evaluator.save_cache()


def prepare_out_dir(out_dir: str | os.PathLike | None, task: str, target: str) -> tuple[Path, bool]:
    """(the output directory, made writable, whether it was made now)."""
    if out_dir is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(OUT_ROOT) / f"{slug(task)}-{slug(target)}-{stamp}"  # a name from a file is no path
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


def slug(name: str) -> str:
    base = name.rsplit(":", 1)[-1] if ":" in name else name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base) or "task"




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
    return analysis, space, CostModel(analysis.layers, profile, batch_size=options.batch_size,
                                      weight_counting=options.weight_bytes), fp32_act


def int8_reference(result: SearchResult, cost_model: CostModel, evaluator: Evaluator,
                   fp32_activation_layers: Sequence[str] = ()) -> dict[str, float | None]:
    """Uniform int8 as a reference beside FP32 (result.json's reference.int8_*): every layer at
    int8/int8 (a layer reading the model's input keeps fp32 activations, as `mpsearch profile
    --precision int8` prices it), its latency and weights on the target and its metric, a trial's
    when the search scored that configuration, else scored once now. None where the target cannot
    run it."""
    cand = reference_candidate(cost_model.layers, "int8", fp32_activation_layers)
    cost = cost_model.price(cand)
    if not cost.feasible:
        return {"int8_metric": None, "int8_latency_ms": None, "int8_weight_bytes": None}
    scored = next((t.metric for t in result.trials if t.state == "complete" and t.config == cand), None)
    if scored is None:
        scored = evaluator.score(cand).metric
    return {"int8_metric": scored, "int8_latency_ms": cost.latency_ms, "int8_weight_bytes": cost.weight_bytes}




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
    cheapest = cheapest_latency_ms(space, cost_model)
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




def cheapest_latency_ms(space: SearchSpace, cost_model: CostModel) -> float:
    """A lower bound of the latency any candidate in the space reaches: the sum of each layer's
    cheapest choice (conversions between compute kinds only add to it)."""
    total = 0.0
    for fqn in space.fqns:
        total += min(cost_model.layer_cost(fqn, c).latency_s for c in space.layer_choices(fqn))
    return total * 1e3


