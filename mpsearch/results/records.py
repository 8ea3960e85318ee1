"""Trial records, the Pareto front, the best trial, and result.json (schema "mpsearch.result/1").

result.json keeps schema version 1 as long as changes only add fields (older readers ignore
them). Added since the first version: settings.max_drop (as given) and settings.drop_budget
({"points", "min_metric", "source"}: the drop budget the best trial was chosen under, see
mpsearch.results.selection), reference.eval_samples, and "selection" (how "best" was chosen);
"verification" (schema "mpsearch.verify/1": `mpsearch verify`'s measurements of the front's
deployed graphs, mpsearch.deploy.verify), settings.target_ref, settings.task_ref and
settings.evaluator_key (what verify reloads and checks). A file
without settings.drop_budget was written before drop budgets: its best is its highest-metric
trial, as it was then.

result.json is strict JSON: a number that is not finite (the infinite latency of a pair the target
cannot run, an FP32-exact trial's infinite SQNR, a NaN hypervolume) is written as null; a null
latency_ms reads back as inf. Reading checks each trial record's types (`check_record`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hw_models import Candidate
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import InvalidConfigError
from mpsearch.results.objectives import (
    DEFAULT_OBJECTIVES,
    front_hypervolume,
    pareto_front,  # the one definition; read from here too
)
from mpsearch.results.selection import Best, select_best

SCHEMA = "mpsearch.result/1"
STATES = ("complete", "infeasible", "pruned", "fail")


# -- strict JSON ----------------------------------------------------------------------------------
def finite_or_null(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, +-inf) replaced by None, through dicts, lists and
    tuples (a new object where something changed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kw: Any) -> str:
    """json.dumps as strict JSON (RFC 8259): NaN and +-Infinity, which Python's json writes as
    tokens other parsers refuse, are written as null. result.json, compare.json, exported
    configurations and the sensitivity cache are written through it. Costs one pass of json's C encoder when there is no such float (the common case; a second
    pass after `finite_or_null` otherwise)."""
    encoder = json.JSONEncoder(allow_nan=False, **kw) if kw else _STRICT_ENCODER
    try:
        return encoder.encode(obj)
    except ValueError:  # "Out of range float values are not JSON compliant"
        return encoder.encode(finite_or_null(obj))


_STRICT_ENCODER = json.JSONEncoder(allow_nan=False)  # reused: json.dumps builds an encoder per call given any option


@dataclass
class TrialRecord:
    """One trial. state: "complete" (scored), "infeasible" (priced only: over budget or a
    precision the target cannot run), "pruned" (stopped early by multi-fidelity scoring: metric
    and proxies on the first `fidelity` share of the evaluation batches; see reason), or "fail"
    (scoring raised; see reason). intervals: 95% confidence intervals [low, high] of "metric" and
    (classifiers) "kl_to_fp32" (mpsearch.metrics' module doc)."""

    number: int
    state: str
    config: Candidate
    metric: float | None
    latency_ms: float
    weight_bytes: int
    bops: int
    feasible: bool
    peak_act_bytes: int = 0
    proxies: dict[str, float] = field(default_factory=dict)
    reason: str = ""
    duplicate_of: int | None = None
    seconds: float = 0.0
    fidelity: float = 1.0
    energy_mj: float | None = None
    sampler_s: float = 0.0  # asking the study for the candidate and telling it the result
    pricing_s: float = 0.0
    scoring_s: float = 0.0
    worker: str = ""  # host:pid of the process that scored it (or priced it, when not scored)
    intervals: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it deep-copies the Candidate, ~60x slower (result.json is
        # rewritten after every trial)
        d = {name: getattr(self, name) for name in _RECORD_FIELDS}
        d["config"] = self.config.to_dict()
        d["proxies"] = dict(self.proxies)
        d["intervals"] = {k: list(v) for k, v in self.intervals.items()}
        return d

    def to_json(self) -> str:
        """to_dict() as compact JSON (the configuration's JSON is computed once per Candidate)."""
        d = {name: getattr(self, name) for name in _RECORD_FIELDS if name != "config"}
        return dumps_strict(d)[:-1] + ', "config": ' + self.config.to_json() + "}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        d = dict(d)
        d["config"] = Candidate.from_dict(d["config"])
        return cls(**d)

    @property
    def mean_weight_bits(self) -> float:
        return sum(c.weight.bits for c in self.config.values()) / len(self.config)

    @property
    def mean_activation_bits(self) -> float:
        return sum(c.activation.bits for c in self.config.values()) / len(self.config)


_RECORD_FIELDS = tuple(f.name for f in fields(TrialRecord))


def best_trial(trials: Sequence[TrialRecord], reference: dict[str, Any] | None = None,
               objectives: Sequence[str] = DEFAULT_OBJECTIVES, drop: dict | None = None) -> int | None:
    """The best trial's number (mpsearch.results.selection.select_best): with a drop budget, the cheapest
    complete feasible trial within it; without one, the highest-metric complete feasible trial
    (ties go to lower latency, then earlier trials)."""
    return select_best(trials, reference or {}, objectives, drop).trial


@dataclass
class SearchResult:
    task: str
    target: str
    reference: dict[str, Any]
    trials: list[TrialRecord]
    settings: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    # `mpsearch verify`'s measurements of the front's deployed graphs (mpsearch.deploy.verify);
    # empty until verified
    verification: dict[str, Any] = field(default_factory=dict)
    # the searched model's layers (hw_models.LayerSpec), for pricing its trials on other targets;
    # set by mpsearch.search, not written to result.json
    layers: tuple = field(default=(), repr=False, compare=False)
    # and its deployed graph (hw_models.graph), for pricing conversions as deployed; not written either
    graph: Any = field(default=None, repr=False, compare=False)

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(self.settings.get("objectives") or DEFAULT_OBJECTIVES)

    @property
    def pareto(self) -> list[int]:
        return pareto_front(self.trials, self.objectives)

    @property
    def hypervolume(self) -> dict[str, Any] | None:
        """The front's hypervolume and its reference point (settings["hv_reference"]), or None."""
        ref = self.settings.get("hv_reference")
        if not ref:
            return None
        # a reference cost written as null (an infinite upper bound: strict JSON) is infinite again
        finite = {k: math.inf if v is None else v for k, v in ref.items()}
        return {"value": front_hypervolume(self.trials, self.objectives, finite), "reference": ref,
                "objectives": list(self.objectives),
                "note": "metric maximized, costs minimized; reference: metric at fp32 - |fp32|, "
                        "each cost at an upper bound over the space (every layer's most expensive choice)"}

    @property
    def timing(self) -> dict[str, float]:
        """Seconds spent in the sampler, in pricing and in scoring over all trials, plus the
        one-time work recorded in settings["setup_s"] (sensitivity, ILP)."""
        out = {"sampler_s": sum(t.sampler_s for t in self.trials), "pricing_s": sum(t.pricing_s for t in self.trials),
               "scoring_s": sum(t.scoring_s for t in self.trials)}
        out.update(self.settings.get("setup_s", {}))
        return out

    @property
    def drop_budget(self) -> dict[str, Any] | None:
        """{"points", "min_metric", "source"}: the drop budget best is chosen under (None: a result
        written before drop budgets; its best is the highest-metric trial)."""
        return self.settings.get("drop_budget")

    @property
    def selection(self) -> Best:
        """The best trial and how it was chosen (mpsearch.results.selection)."""
        return select_best(self.trials, self.reference, self.objectives, self.drop_budget)

    @property
    def best(self) -> int | None:
        return self.selection.trial

    def trial(self, number: int) -> TrialRecord:
        for t in self.trials:
            if t.number == number:
                return t
        raise KeyError(number)

    def to_dict(self, trials: bool = True) -> dict[str, Any]:
        d = {
            "schema": SCHEMA,
            "task": self.task,
            "target": self.target,
            "reference": self.reference,
            "settings": self.settings,
            "space": self.space,
            "tracking": self.tracking,
            "interrupted": self.interrupted,
            "pareto": self.pareto,
            "best": (sel := self.selection).trial,
            "selection": sel.to_dict(),
            "hypervolume": self.hypervolume,
            "timing": self.timing,
        }
        if self.verification:
            d["verification"] = self.verification
        if trials:
            d["trials"] = [t.to_dict() for t in self.trials]
        return d

    def write(self, path: str | Path, memo: dict[int, tuple[TrialRecord, str]] | None = None) -> None:
        """Write result.json atomically (readers never see a partial file): indented, with one
        trial a line (compact JSON per trial is what keeps rewriting it after every trial cheap:
        json's C encoder does not indent). memo: the JSON of records that no longer change, by
        id (the search loop rewrites the file after every trial; it encodes each record once)."""
        d = self.to_dict(trials=False)
        head = dumps_strict(d, indent=1)
        if memo is None:
            body = ",\n  ".join(t.to_json() for t in self.trials)
        else:
            lines = []
            for t in self.trials:
                hit = memo.get(id(t))
                if hit is None or hit[0] is not t:
                    hit = memo[id(t)] = (t, t.to_json())
                lines.append(hit[1])
            body = ",\n  ".join(lines)
        text = head[: head.rindex("}")].rstrip() + ',\n "trials": [' + (f"\n  {body}\n ]" if self.trials else "]") + "\n}\n"
        # no fsync: a killed process loses nothing written, and the study (fsynced by its storage)
        # is what a resume rebuilds result.json from
        atomic_write_bytes(path, text.encode(), durable=False)

    @classmethod
    def read(cls, path: str | Path) -> SearchResult:
        """The result.json at `path`. Raises InvalidConfigError (one line naming the file) when it
        is missing, not JSON, of another schema or lacks a field this schema has, and (naming the
        trial and the field) when a trial record holds a value of the wrong type (`check_record`).
        A latency written as null (it was infinite: a pair the target cannot run) reads as inf."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidConfigError(f"{path}: no such file (the output directory of a search holds result.json)") \
                from None
        except (OSError, ValueError) as e:
            raise InvalidConfigError(f"{path}: not a readable result.json ({e})") from None
        schema = d.get("schema") if isinstance(d, dict) else None
        if schema != SCHEMA:
            raise InvalidConfigError(f"{path}: schema {schema!r}, expected {SCHEMA!r}: not a result.json of mpsearch")
        try:
            head = {"task": d["task"], "target": d["target"], "reference": d["reference"]}
            trials_data = d["trials"]
        except KeyError as e:
            raise InvalidConfigError(f"{path}: not a readable result.json (KeyError: {e})") from None
        if not isinstance(trials_data, list):
            raise InvalidConfigError(f"{path}: trials: expected a list of trial records, found {trials_data!r:.60}")
        trials = []
        for i, t in enumerate(trials_data):
            n = t.get("number") if isinstance(t, dict) else None
            label = f"trial {n}" if isinstance(n, int) and not isinstance(n, bool) else f"trials[{i}]"
            try:
                trials.append(check_record(t))
            except RecordError as e:
                raise InvalidConfigError(f"{path}: {label}: {e}") from None
        try:
            return cls(
                **head,
                trials=trials,
                settings=d.get("settings", {}),
                space=d.get("space", {}),
                tracking=d.get("tracking", {}),
                interrupted=d.get("interrupted", False),
                verification=d.get("verification") or {},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidConfigError(f"{path}: not a readable result.json ({type(e).__name__}: {e})") from None


class RecordError(ValueError):
    """A trial record with a value of the wrong type; the message starts with the field."""


_INT_FIELDS = ("number", "weight_bytes", "bops", "peak_act_bytes")
_FLOAT_FIELDS = ("seconds", "fidelity", "sampler_s", "pricing_s", "scoring_s")
_STR_FIELDS = ("reason", "worker")
_REQUIRED = ("number", "state", "config", "metric", "latency_ms", "weight_bytes", "bops", "feasible")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_record(d: Any) -> TrialRecord:
    """The TrialRecord a result.json trial entry holds, its types checked: integers for numbers,
    sizes and BOPs, numbers for times, a known state, a finite metric in a complete trial (a
    number or null otherwise), a number or null for latency_ms (null: inf), energy_mj and each
    proxy, true / false for feasible, strings for reason and worker. Fields this version does not
    know are ignored (a newer writer's). Raises RecordError "<field>: <what is wrong>"."""
    if not isinstance(d, dict):
        raise RecordError(f"expected an object, found {d!r:.60}")
    for k in _REQUIRED:
        if k not in d:
            raise RecordError(f"{k}: missing")
    kw: dict[str, Any] = {k: v for k, v in d.items() if k in _RECORD_FIELDS}

    def bad(field_name: str, expected: str) -> RecordError:
        return RecordError(f"{field_name}: expected {expected}, found {d[field_name]!r:.60}")

    for k in _INT_FIELDS:
        if k in kw:
            v = kw[k]
            if isinstance(v, float) and v.is_integer():
                v = kw[k] = int(v)
            if not (_is_number(v) and isinstance(v, int)) or v < 0:
                raise bad(k, "a non-negative integer")
    for k in _FLOAT_FIELDS:
        if k in kw and not (_is_number(kw[k]) and math.isfinite(kw[k])):
            raise bad(k, "a finite number")
    for k in _STR_FIELDS:
        if k in kw and not isinstance(kw[k], str):
            raise bad(k, "a string")
    if kw["state"] not in STATES:
        raise RecordError(f"state: {kw['state']!r:.60} is not one of {', '.join(STATES)}")
    if not isinstance(kw["feasible"], bool):
        raise bad("feasible", "true or false")
    for k in ("metric", "latency_ms", "energy_mj"):
        if k in kw and kw[k] is not None and not _is_number(kw[k]):
            raise bad(k, "a number or null")
    if kw["state"] == "complete" and (kw["metric"] is None or not math.isfinite(kw["metric"])):
        raise RecordError(f"metric: a complete trial needs a finite number, found {kw['metric']!r}")
    if kw["latency_ms"] is None:
        kw["latency_ms"] = math.inf
    dup = kw.get("duplicate_of")
    if dup is not None and (not _is_number(dup) or not isinstance(dup, int)):
        raise bad("duplicate_of", "a trial number or null")
    proxies = kw.get("proxies", {})
    if not isinstance(proxies, dict) or not all(v is None or _is_number(v) for v in proxies.values()):
        raise bad("proxies", "an object of numbers or nulls")
    intervals = kw.get("intervals", {})
    if not isinstance(intervals, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) for v in intervals.values()
    ):
        raise bad("intervals", "an object of [low, high] number pairs")
    try:
        kw["config"] = Candidate.from_dict(kw["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise RecordError(f"config: {type(e).__name__}: {e}") from None
    return TrialRecord(**kw)


def speedup(fp32_latency_ms: float | None, latency_ms: float | None) -> float | None:
    """FP32's latency over `latency_ms` (None where either is unknown, zero or not finite)."""
    if not fp32_latency_ms or not latency_ms or not math.isfinite(latency_ms) or latency_ms <= 0:
        return None
    return fp32_latency_ms / latency_ms


def layer_breakdown(cost_model, record: TrialRecord) -> list[dict[str, Any]]:
    """Per-layer latency of a trial's configuration on the cost model's target: the rows of
    result.json's settings["breakdown"] and of each compare.json target's "breakdown" (what the
    report's latency_breakdown figure draws)."""
    return [{"fqn": c.fqn, "latency_us": c.latency_s * 1e6, "transition_us": c.transition_s * 1e6,
             "compute": c.compute, "bound": c.bound if c.supported else "unsupported",
             "precision": f"{c.choice.weight}/{c.choice.activation}"}
            for c in cost_model.breakdown(record.config)]
