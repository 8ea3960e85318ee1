"""Per-layer sensitivity: how far the output moves from FP32 when one layer alone is quantized.

The sensitivity of (layer L, choice c) is the divergence of the model's output from the FP32
reference when only L is at c (quantized as the Evaluator does it: its weight, bias correction
included, and the activations the deployed graph of that configuration quantizes, for an int8
convolution its input and its output) and every other layer is FP32, on the first `batches`
evaluation batches:

- classifiers: "kl_to_fp32", the mean KL(FP32 || quantized) of the softmax outputs (nats),
  as `Score.proxies["kl_to_fp32"]` computes it;
- other task kinds: "normalized_mse", the output noise energy over the FP32 output energy,
  sum (y_q - y)^2 / sum y^2 = 10 ** (-sqnr_db / 10).

Suffix evaluation. A layer quantized alone changes nothing computed before its first call, so the
model is traced with torch.fx; per batch the FP32 graph is run once, in layer order, keeping only
the values live across the next cut, and for each layer every choice re-runs only the nodes from
that layer's call onward, fed the cached FP32 values. The traced graph calls the evaluator's own
submodules, so its weight swaps and forward hooks (activation quantizers, bias corrections) apply
unchanged. A model that cannot be traced, or whose trace does not reach every hook point or does
not reproduce the FP32 outputs, is measured with whole forward passes instead (`Sensitivity.path`).

Cost: about (pairs x average suffix share x samples) forward passes of one sample; for
mobilenet_v2 on x86-vnni (583 pairs) the suffix averages ~half the network. The default sample
count (DEFAULT_SAMPLES = 64) was chosen there: allocations solved (mpsearch.engine.ilp) from 64-sample
sensitivities came within ~4% of the optimum under 256-sample ones (16 samples: up to ~45%,
128: under 1%), at a quarter of the cost. Pass `batches` for more.

Disk cache: `cache_dir / f"sensitivity-{key}.json"`, key = hash of the evaluator's cache key, the
number of batches and the measure; values found there are reused, new ones merged in atomically,
every CHUNK_PAIRS pairs, so an interrupted measurement resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from hw_models import Candidate, LayerChoice, Precision
from mpsearch import metrics
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import EvaluationError, InvalidConfigError
from mpsearch.results.records import dumps_strict
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks.base import run_model

__all__ = [
    "DEFAULT_SAMPLES",
    "Sensitivity",
    "cache_path",
    "default_batches",
    "measure_sensitivity",
    "pair_name",
    "parse_pair",
]

CACHE_VERSION = 2
DEFAULT_SAMPLES = 64  # batches=None: the first batches holding at least this many samples
CHUNK_PAIRS = 64  # pairs measured between cache writes (each chunk re-runs the FP32 prefix once)
KL = "kl_to_fp32"
NMSE = "normalized_mse"
FP32_PAIR = LayerChoice(Precision.FP32, Precision.FP32)


def alone(evaluator: Evaluator, fqn: str, c: LayerChoice) -> Candidate:
    """The candidate with layer `fqn` at `c` and every other layer FP32."""
    return Candidate((f, c if f == fqn else FP32_PAIR) for f in evaluator.analysis.fqns)


def pair_name(c: LayerChoice) -> str:
    """ "int4/int8": weight / activation precision."""
    return f"{c.weight.value}/{c.activation.value}"


def parse_pair(name: str) -> LayerChoice:
    w, a = name.split("/")
    return LayerChoice(Precision.parse(w), Precision.parse(a))


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer sensitivities (>= 0, higher is worse, 0 for the FP32 pair).

    measure: "kl_to_fp32" (classifiers) or "normalized_mse" (other kinds), see the module doc.
    values: layer fqn -> choice -> sensitivity, for every pair of the options asked for.
    seconds: time spent measuring (0 when everything came from the cache).
    from_cache: how many (layer, choice) values came from the disk cache.
    batches: how many evaluation batches were used.
    path: how the measured values were computed: "suffix" (traced graph, re-running only the
        layers after the quantized one), "full" (whole forward passes) or "cache" (none measured).
    note: why the "full" path was taken.
    """

    measure: str
    values: dict[str, dict[LayerChoice, float]]
    seconds: float = 0.0
    from_cache: int = 0
    batches: int = 0
    path: str = "cache"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "batches": self.batches,
            "path": self.path,
            "seconds": self.seconds,
            "from_cache": self.from_cache,
            "note": self.note,
            "values": _values_to_json(self.values),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sensitivity:
        return cls(
            measure=str(d["measure"]),
            values=_values_from_json(d["values"]),
            seconds=float(d.get("seconds", 0.0)),
            from_cache=int(d.get("from_cache", 0)),
            batches=int(d.get("batches", 0)),
            path=str(d.get("path", "cache")),
            note=str(d.get("note", "")),
        )


def _values_to_json(values: Mapping[str, Mapping[LayerChoice, float]]) -> dict[str, dict[str, float]]:
    return {fqn: {pair_name(c): float(v) for c, v in per.items()} for fqn, per in values.items()}


def _values_from_json(d: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[LayerChoice, float]]:
    """null (a value that was not finite: strict JSON has no NaN or Infinity) counts as not measured."""
    return {fqn: {parse_pair(k): float(v) for k, v in per.items() if v is not None} for fqn, per in d.items()}


def default_batches(evaluator: Evaluator, samples: int = DEFAULT_SAMPLES) -> int:
    """The number of leading evaluation batches holding at least `samples` samples (or all)."""
    n = 0
    for i, out in enumerate(evaluator.reference_outputs):
        n += out.shape[0]
        if n >= samples:
            return i + 1
    return len(evaluator.reference_outputs)


def cache_path(evaluator: Evaluator, cache_dir: str | Path, batches: int, measure: str) -> Path:
    """The JSON file holding sensitivities for this evaluator, batch count and measure."""
    ident = f"mpsearch-sensitivity/{CACHE_VERSION}/{evaluator.cache_key()}/{batches}/{measure}"
    h = hashlib.sha256(ident.encode())
    return Path(cache_dir) / f"sensitivity-{h.hexdigest()[:24]}.json"


def measure_sensitivity(
    evaluator: Evaluator,
    options: Mapping[str, Sequence[LayerChoice]],
    *,
    batches: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    suffix: bool = True,
) -> Sensitivity:
    """Sensitivity of every (layer, choice) in `options` (see the module doc).

    batches: leading evaluation batches to use (None: enough for DEFAULT_SAMPLES samples).
    cache_dir: where the JSON cache lives (None: no disk cache).
    progress: a tqdm bar on stderr over the (layer, choice) pairs measured.
    suffix: False forces whole forward passes (the slower reference path).
    """
    start = time.perf_counter()
    n_eval = len(evaluator.task.eval_batches)
    if batches is None:
        batches = default_batches(evaluator)
    elif not 1 <= batches <= n_eval:
        raise InvalidConfigError(f"batches must be between 1 and {n_eval}, got {batches}")
    unknown = [f for f in options if f not in evaluator.handles]
    if unknown:
        raise InvalidConfigError(f"no quantizable layer named {', '.join(unknown)}")
    measure = KL if evaluator.task.kind == "classifier" else NMSE

    values: dict[str, dict[LayerChoice, float]] = {}
    todo: list[tuple[str, LayerChoice]] = []
    path = cache_path(evaluator, cache_dir, batches, measure) if cache_dir is not None else None
    cached = _read_cache(path, measure, batches)
    from_cache = 0
    for fqn, choices in options.items():
        per = values[fqn] = {}
        for c in dict.fromkeys(choices):
            if c == FP32_PAIR:
                per[c] = 0.0
            elif (v := cached.get(fqn, {}).get(c)) is not None:
                per[c] = v
                from_cache += 1
            else:
                per[c] = math.nan
                todo.append((fqn, c))
    if not todo:
        return Sensitivity(measure, values, 0.0, from_cache, batches, "cache")

    runner, note = None, "suffix=False"
    if suffix:
        runner, note = _SuffixRunner.build(evaluator, todo, batches)
    how = "suffix" if runner is not None else "full"
    if runner is not None:  # in layer order, so that each chunk's FP32 prefix stops early
        todo.sort(key=lambda fc: runner.cuts[fc[0]])
    bar = tqdm(total=len(todo), desc="layer sensitivity", unit="pair", file=sys.stderr, disable=not progress)
    try:
        for i in range(0, len(todo), CHUNK_PAIRS):
            acc = _Accumulator(evaluator, measure, todo[i : i + CHUNK_PAIRS], batches)
            if runner is not None:
                runner.run(acc, bar)
            else:
                _run_full(evaluator, acc, batches, bar)
            for (fqn, c), v in acc.values().items():
                values[fqn][c] = v
            if path is not None:  # saved as it goes: an interrupted run resumes from here
                _write_cache(path, measure, batches, values)
    finally:
        evaluator.restore()
        bar.close()
    seconds = time.perf_counter() - start
    return Sensitivity(measure, values, seconds, from_cache, batches, how, note)


# -- accumulating the measure ----------------------------------------------------------------
class _Accumulator:
    """Per-pair sums of the measure over batches, and the prepared quantization of each pair."""

    def __init__(self, evaluator: Evaluator, measure: str, todo: list[tuple[str, LayerChoice]], batches: int):
        self.ev = evaluator
        self.measure = measure
        self.todo = todo
        self.refs = evaluator.reference_outputs[:batches]
        self.n_samples = sum(r.shape[0] for r in self.refs)
        self.signal = sum(float(r.double().pow(2).sum()) for r in self.refs)
        self.sums = dict.fromkeys(todo, 0.0)
        # everything first (computing a weight may run the FP32 model), as Evaluator._run does
        self.parts = {}
        for fqn, c in todo:
            plan = evaluator.plan(alone(evaluator, fqn, c))
            self.parts[(fqn, c)] = (
                evaluator.weight(fqn, c.weight),
                {f: evaluator.act_params(f, p) for f, p in plan.sim_inputs.items()},
                {m: evaluator.out_params(m) for m in plan.sim_outputs},
                evaluator.bias_delta(fqn, c.weight),
            )

    def swap_in(self, fqn: str, c: LayerChoice) -> None:
        weight, inputs, outputs, delta = self.parts[(fqn, c)]
        h = self.ev.handles[fqn]
        getattr(h.module, h.param).data = weight
        self.ev._active.update(inputs)
        self.ev._active_out.update(outputs)
        if delta is not None:
            self.ev._active_delta[fqn] = delta

    def swap_out(self, fqn: str) -> None:
        h = self.ev.handles[fqn]
        getattr(h.module, h.param).data = self.ev._fp32_weights[fqn]
        self.ev._active.clear()
        self.ev._active_out.clear()
        self.ev._active_delta.pop(fqn, None)

    def add(self, fqn: str, c: LayerChoice, i: int, out: Any) -> None:
        """Add batch i's output of the model with (fqn, c) quantized."""
        if not isinstance(out, torch.Tensor):
            raise EvaluationError(f"the model's output is a {type(out).__name__}, not a tensor")
        if not torch.isfinite(out).all():
            raise EvaluationError(f"layer {fqn} at {pair_name(c)}: non-finite output on evaluation batch {i}")
        ref = self.refs[i]
        if self.measure == KL:
            self.sums[(fqn, c)] += metrics.kl_divergence([out], [ref]) * ref.shape[0]
        else:
            self.sums[(fqn, c)] += float((out.double() - ref.double()).pow(2).sum())

    def values(self) -> dict[tuple[str, LayerChoice], float]:
        denom = self.n_samples if self.measure == KL else self.signal
        return {k: max(0.0, s / denom) if denom else 0.0 for k, s in self.sums.items()}


def _run_full(evaluator: Evaluator, acc: _Accumulator, batches: int, bar) -> None:
    """Whole forward passes of the evaluator's model, one (layer, choice) at a time."""
    with torch.no_grad():
        for fqn, c in acc.todo:
            acc.swap_in(fqn, c)
            try:
                for i, (inputs, _) in enumerate(evaluator.task.eval_batches[:batches]):
                    acc.add(fqn, c, i, run_model(evaluator.model, inputs))
            finally:
                acc.swap_out(fqn)
            bar.update(1)


# -- suffix evaluation on a traced graph -----------------------------------------------------
_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


class _SuffixRunner:
    """Runs the FP32 graph once per batch, and for each layer only the nodes from its first call."""

    def __init__(self, evaluator: Evaluator, gm: torch.fx.GraphModule, cuts: dict[str, int], batches: int):
        self.ev = evaluator
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.cuts = cuts
        self.batches = batches
        n = len(self.nodes)
        # dies[i]: nodes whose value is not needed after node i has run
        self.dies: list[list[torch.fx.Node]] = [[] for _ in range(n)]
        for i, node in enumerate(self.nodes):
            last = max((self.index[u] for u in node.users), default=i)
            self.dies[last].append(node)
        # node index -> the node whose value it modifies in place (its first argument)
        self.mutates: dict[int, torch.fx.Node] = {}
        for i, node in enumerate(self.nodes):
            if node.args and isinstance(node.args[0], torch.fx.Node) and self._in_place(node):
                self.mutates[i] = node.args[0]
        self.modules = {n.target: gm.get_submodule(n.target) for n in self.nodes if n.op == "call_module"}

    @classmethod
    def build(cls, evaluator: Evaluator, todo: list[tuple[str, LayerChoice]], batches: int
              ) -> tuple[_SuffixRunner | None, str]:
        """The runner, or None and why the model must be run whole."""
        fqns = [f for f, _ in todo]
        # modules whose hooks each pair's plan turns on: they must be called by the traced graph
        hooked: dict[str, set[str]] = {}
        for fqn, c in todo:
            plan = evaluator.plan(alone(evaluator, fqn, c))
            hooked.setdefault(fqn, set()).update(plan.sim_outputs)
            hooked[fqn].update(f"in:{f}" for f in plan.sim_inputs)
        try:
            gm = torch.fx.symbolic_trace(evaluator.model)
        except Exception as e:  # noqa: BLE001 - untraceable models fall back to whole passes
            return None, f"torch.fx cannot trace the model ({type(e).__name__})"
        cuts: dict[str, int] = {}
        touched: list[set[int]] = []
        called: list[int] = []  # id of the module each node calls (0: none)
        for node in gm.graph.nodes:
            ids: set[int] = set()
            mod_id = 0
            if node.op in ("call_module", "get_attr"):
                obj = _get_attr(gm, node.target)
                if isinstance(obj, torch.nn.Module):
                    ids |= {id(m) for m in obj.modules()} | {id(p) for p in obj.parameters()}
                    mod_id = id(obj) if node.op == "call_module" else 0
                else:
                    ids.add(id(obj))
            touched.append(ids)
            called.append(mod_id)
        for fqn in dict.fromkeys(fqns):
            h = evaluator.handles[fqn]
            param = getattr(h.module, h.param)
            marks = {id(h.module), id(param), id(h.input_module)}
            hits = [i for i, ids in enumerate(touched) if ids & marks]
            if not hits:
                return None, f"layer {fqn} is not reached by the traced graph"
            # the evaluator's hooks fire only where the traced graph calls their module itself
            needs = [h.input_module] if h.input_module is not None else []
            if fqn in evaluator._input_means:
                needs.append(h.module)
            modules = dict(evaluator.model.named_modules())
            for name in hooked.get(fqn, ()):
                m = (evaluator.handles[name[3:]].input_module if name.startswith("in:") else modules[name])
                if m is not None:
                    needs.append(m)
            if any(id(m) not in called for m in needs):
                return None, f"the traced graph does not call the hooked module of layer {fqn}"
            cuts[fqn] = hits[0]
        runner = cls(evaluator, gm, cuts, batches)
        try:
            with torch.no_grad():
                inputs = evaluator.task.eval_batches[0][0]
                out = runner._run(runner._bind(inputs), 0)
            ref = evaluator.reference_outputs[0]
            ok = isinstance(out, torch.Tensor) and out.shape == ref.shape and torch.allclose(
                out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())
            )
        except Exception as e:  # noqa: BLE001
            return None, f"the traced graph fails to run ({type(e).__name__})"
        if not ok:
            return None, "the traced graph does not reproduce the FP32 outputs"
        return runner, ""

    @staticmethod
    def _in_place(node: torch.fx.Node) -> bool:
        if node.kwargs.get("inplace") is True:
            return True
        if node.op == "call_module":
            return getattr(_get_attr(node.graph.owning_module, node.target), "inplace", False) is True
        if node.op == "call_function":
            if node.target in _INPLACE_OPERATORS:
                return True
            name = getattr(node.target, "__name__", "")
            return name.endswith("_") and not name.endswith("__")
        if node.op == "call_method":
            name = str(node.target)
            return (name.endswith("_") and not name.endswith("__")) or name == "__setitem__"
        return False

    def _bind(self, inputs: Any) -> dict[torch.fx.Node, Any]:
        """Values of the placeholders for one batch of inputs."""
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        env: dict[torch.fx.Node, Any] = {}
        k = 0
        for node in self.nodes:
            if node.op != "placeholder":
                continue
            if k < len(args):
                env[node] = args[k]
            elif node.args:
                env[node] = node.args[0]  # the default value
            else:
                raise EvaluationError(f"the traced model expects an argument {node.target!r}")
            k += 1
        return env

    def _node(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        args = torch.fx.node.map_arg(node.args, env.__getitem__)
        kwargs = torch.fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "get_attr":
            return _get_attr(self.gm, node.target)
        raise AssertionError(node.op)

    def _run(
        self,
        env: dict[torch.fx.Node, Any],
        start: int,
        stop: int | None = None,
        protect: frozenset[int] = frozenset(),
    ) -> Any:
        """Run nodes start..stop-1 (to the output when stop is None) in `env`; returns the output.

        protect: storages of the FP32 frontier, shared by every suffix run: a tensor on one of
        them is copied before an in-place op (ReLU(inplace=True), add_, ...) modifies it.
        """
        end = len(self.nodes) if stop is None else stop
        for i in range(start, end):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], env.__getitem__)
            src = self.mutates.get(i)
            if protect and src is not None and _storage(env[src]) in protect:
                env[src] = env[src].clone()
            env[node] = self._node(node, env)
            for dead in self.dies[i]:
                env.pop(dead, None)
        return None

    def run(self, acc: _Accumulator, bar) -> None:
        by_cut: dict[int, list[tuple[str, LayerChoice]]] = {}
        for fqn, c in acc.todo:
            by_cut.setdefault(self.cuts[fqn], []).append((fqn, c))
        order = sorted(by_cut)
        done, base = 0, bar.n
        with torch.no_grad():
            for b, (inputs, _) in enumerate(self.ev.task.eval_batches[: self.batches]):
                env = self._bind(inputs)  # the FP32 values live across the next cut
                pos = 0
                for cut in order:
                    self._run(env, pos, cut)
                    pos = cut
                    protect = frozenset(_storage(v) for v in env.values()) - {None}
                    for fqn, c in by_cut[cut]:
                        acc.swap_in(fqn, c)
                        try:
                            out = self._run(dict(env), cut, protect=protect)
                        finally:
                            acc.swap_out(fqn)
                        acc.add(fqn, c, b, out)
                        done += 1
                        bar.update(base + done // self.batches - bar.n)


def _storage(x: Any) -> int | None:
    """The address of a tensor's storage (views share it); None for anything else."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return x.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _get_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# -- disk cache ------------------------------------------------------------------------------
def _read_cache(path: Path | None, measure: str, batches: int) -> dict[str, dict[LayerChoice, float]]:
    if path is None or not path.exists():
        return {}
    try:
        d = json.loads(path.read_text())
        if d.get("version") != CACHE_VERSION or d.get("measure") != measure or d.get("batches") != batches:
            return {}
        return _values_from_json(d["values"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"mpsearch: warning: sensitivity cache {path} unusable ({type(e).__name__}); rebuilding it",
              file=sys.stderr)
        return {}


def _write_cache(
    path: Path, measure: str, batches: int, values: Mapping[str, Mapping[LayerChoice, float]]
) -> None:
    """Merge `values` into the file (re-read first, so that concurrent writers lose nothing)."""
    merged = _read_cache(path, measure, batches)
    for fqn, per in values.items():
        done = {c: v for c, v in per.items() if c != FP32_PAIR and not math.isnan(v)}
        merged.setdefault(fqn, {}).update(done)
    doc = {
        "version": CACHE_VERSION,
        "measure": measure,
        "batches": batches,
        "values": _values_to_json(merged),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, dumps_strict(doc, indent=1, sort_keys=True).encode())
