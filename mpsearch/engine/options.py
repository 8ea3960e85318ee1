"""SearchOptions: what one search searches and how, in one validated, versioned value.

`mpsearch.search()` builds it once from its keywords (the command line passes the same keywords),
validates it before any work, and keeps it: stored in the study (the `mpsearch.launch` user
attribute) for the `mpsearch worker` processes and Ray workers that join, and written into
result.json (`settings.options`). Adding an option means adding a field here (with its check);
to_dict / from_dict carry it everywhere else.

What is not an option here is how one run is carried out and reported (its output directory,
storage, MLflow store, progress bars, resume): those are the run's, not the search's, and a
worker chooses its own.

The schema has a version (OPTIONS_VERSION). A stored launch record of an older version, or without
one (written before the version existed), still reads: the fields it lacks take their defaults; a
newer version is refused in one line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from hw_models import LayerChoice, Precision
from hw_models.cost import WEIGHT_BYTES
from mpsearch.defaults import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RETRIES,
    DEFAULT_SAMPLER,
    DEFAULT_SEED,
    DEFAULT_SENSITIVITY,
    DEFAULT_STRATEGY,
    DEFAULT_TARGET,
    DEFAULT_TRIALS,
    DEFAULT_WORKER_THREADS,
    EXHAUSTIVE_LIMIT,
    SAMPLERS,
    SENSITIVITY_METHODS,
    STRATEGIES,
)
from mpsearch.engine.budgets import Relative, parse_budget
from mpsearch.errors import InvalidConfigError
from mpsearch.results.objectives import DEFAULT_OBJECTIVES, parse_objectives
from mpsearch.results.selection import parse_max_drop
from mpsearch.scoring.evaluator import QuantSettings

BUDGET_FIELDS = {"latency": "latency_budget_ms", "size": "size_budget_mb", "memory": "memory_budget_mb"}
OPTIONS_VERSION = 3  # 2: relative budgets ("0.5xfp32", "75%int8"), weight_bytes and patience; 3: sensitivity


def _positive_int(name: str, v: Any, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise InvalidConfigError(f"{name}: expected an integer of at least {low}, got {v!r}")


def parse_precisions(names: Iterable[str | Precision] | None, what: str) -> tuple[Precision, ...] | None:
    """Precisions from names ("int8", Precision.INT8, or "int4,int8"), without repeats; None: none
    given. InvalidConfigError for an unknown name or an empty list."""
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


def _names(precisions: tuple[Precision, ...] | None) -> tuple[str, ...] | None:
    return None if precisions is None else tuple(p.value for p in precisions)


def _pin(choice: str | LayerChoice) -> str:
    return choice if isinstance(choice, str) else f"{choice.weight.value}/{choice.activation.value}"


@dataclass(frozen=True)
class SearchOptions:
    """The options of one search (see mpsearch.search for what each means). Values are checked
    when it is made: InvalidConfigError names the first one that cannot work. Precisions,
    objectives, ties and pins are kept in their text forms, as result.json and the study hold them.

    task: the task's reference (a built-in name, "module:function" or "file.py:function"), None
    for a Task object handed to the API (such a search cannot be joined by workers). target: a
    profile name, or a profile file's absolute path."""

    task: str | None
    target: str = DEFAULT_TARGET
    n_trials: int = DEFAULT_TRIALS
    strategy: str = DEFAULT_STRATEGY
    sampler: str = DEFAULT_SAMPLER
    seed: int | None = DEFAULT_SEED
    objectives: tuple[str, ...] = DEFAULT_OBJECTIVES
    latency_budget_ms: float | str | None = None  # ms, or relative: "0.5xfp32", "75%int8" (engine.budgets)
    size_budget_mb: float | str | None = None
    memory_budget_mb: float | str | None = None
    weight_bytes: str = "with-scales"  # or "payload" (hw_models.cost.WEIGHT_BYTES)
    max_drop: float | str | None = None
    weight_precisions: tuple[str, ...] | None = None
    activation_precisions: tuple[str, ...] | None = None
    ties: tuple[tuple[str, ...], ...] = ()
    pins: Mapping[str, str] = field(default_factory=dict)
    pin_first_last: bool = False
    batch_size: int = DEFAULT_BATCH_SIZE
    quant: QuantSettings = field(default_factory=QuantSettings)
    early_stop: bool = False
    evaluator_cache: bool = True
    n_seeds: int | None = None
    patience: int | None = None  # a budgeted hybrid search: trials without a better one before it stops
    sensitivity: str = DEFAULT_SENSITIVITY  # how the ilp and hybrid strategies measure it (engine.sensitivity.METHODS)
    exhaustive_limit: int = EXHAUSTIVE_LIMIT
    backend: str = DEFAULT_BACKEND
    ray_address: str | None = None
    workers: int | None = None
    worker_threads: int = DEFAULT_WORKER_THREADS
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.n_trials, bool) or not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise InvalidConfigError(f"the number of trials must be a positive integer, got {self.n_trials!r}")
        for kind, name in BUDGET_FIELDS.items():
            v = parse_budget(getattr(self, name), kind)
            put(name, v.text if isinstance(v, Relative) else v)
        if self.weight_bytes not in WEIGHT_BYTES:
            raise InvalidConfigError(f"weight bytes: {self.weight_bytes!r} is not one of {', '.join(WEIGHT_BYTES)}")
        parse_max_drop(self.max_drop)
        put("objectives", parse_objectives(self.objectives))
        if self.strategy not in STRATEGIES:
            raise InvalidConfigError(f"unknown strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})")
        if self.sampler not in SAMPLERS:
            raise InvalidConfigError(f"unknown sampler {self.sampler!r} (known: {', '.join(SAMPLERS)})")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidConfigError(f"seed: expected an integer or None, got {self.seed!r}")
        put("weight_precisions", _names(parse_precisions(self.weight_precisions, "weight")))
        put("activation_precisions", _names(parse_precisions(self.activation_precisions, "activation")))
        put("ties", tuple(tuple(t) for t in self.ties))
        put("pins", MappingProxyType({f: _pin(c) for f, c in (self.pins or {}).items()}))
        _positive_int("batch size", self.batch_size)
        if isinstance(self.quant, Mapping):
            put("quant", QuantSettings(**self.quant))
        if self.n_seeds is not None:
            _positive_int("ILP seeds", self.n_seeds)
        if self.patience is not None:
            _positive_int("patience", self.patience, low=0)
        if self.sensitivity not in SENSITIVITY_METHODS:
            raise InvalidConfigError(f"sensitivity method {self.sensitivity!r} is not one of "
                                     f"{', '.join(SENSITIVITY_METHODS)}")
        _positive_int("exhaustive limit", self.exhaustive_limit)
        if self.backend not in BACKENDS:
            raise InvalidConfigError(f"unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})")
        if self.backend != "ray":
            for name in ("ray_address", "workers"):
                if getattr(self, name) is not None:
                    raise InvalidConfigError(f"{name.replace('_', '-')} needs the ray backend (--backend ray)")
        if self.workers is not None:
            _positive_int("workers", self.workers)
        _positive_int("worker threads", self.worker_threads)
        _positive_int("retries", self.retries, low=0)

    def budgets_given(self) -> dict[str, float | Relative | None]:
        """{"latency", "size", "memory"}: each budget as a number or a Relative (engine.budgets.resolve)."""
        return {kind: parse_budget(getattr(self, name), kind) for kind, name in BUDGET_FIELDS.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the schema version (from_dict reads it back)."""
        d: dict[str, Any] = {"version": OPTIONS_VERSION}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "quant":
                v = v.to_dict()
            elif f.name == "pins":
                v = dict(v)
            elif f.name == "ties":
                v = [list(t) for t in v]
            elif isinstance(v, tuple):
                v = list(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the stored search options") -> SearchOptions:
        """The options to_dict wrote, or a launch record written before the version existed (the
        same fields; those it lacks take their defaults). InvalidConfigError, in one line naming
        `where`, for a newer version, a field this version does not know, or a value that fails
        its check."""
        version = d.get("version")
        if version is not None and not (isinstance(version, int) and 1 <= version <= OPTIONS_VERSION):
            raise InvalidConfigError(f"{where}: options version {version!r}, this mpsearch reads version "
                                     f"{OPTIONS_VERSION}: use the mpsearch that wrote them")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"version"})
        if unknown:
            raise InvalidConfigError(f"{where}: unknown option {unknown[0]!r} (written by another mpsearch?)")
        kw = {k: v for k, v in d.items() if k != "version"}
        if "task" not in kw:
            raise InvalidConfigError(f"{where}: no task")
        try:
            return cls(**kw)
        except InvalidConfigError as e:
            raise InvalidConfigError(f"{where}: {e}") from None
        except TypeError as e:  # a wrong type the checks do not name (e.g. quant not an object)
            raise InvalidConfigError(f"{where}: {e}") from None
