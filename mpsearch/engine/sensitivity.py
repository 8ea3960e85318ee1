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

Two methods measure it (`method`):

"fisher" (default): the second-order (Fisher) estimate, as HAWQ and MCT price a layer, but of
each pair's own perturbation rather than a Hessian trace times a weight error. The model is traced
with torch.fx; per batch one FP32 forward and PROBES backward passes give, at every tensor a
quantized layer changes, the gradient of a random projection r of the output, with E[r r^T] the
output's Fisher metric (diag(p) - p p^T of the softmax for KL, the identity for the normalized
MSE). Each pair then re-runs only its own few nodes (the layer and the quantizers the deployed
graph puts around it) to get the change d it makes there, and the estimate is the mean over
probes of (g . d)^2 (for KL halved): KL(p || q) = 1/2 dz^T (diag(p) - p p^T) dz + O(|dz|^3)
for a change dz of the logits, and E[(r^T J d)^2] = d^T J^T E[r r^T] J d. The probes are seeded,
so the estimate is reproducible. On mobilenet_v2 (weights int8/int4/int2, 159 pairs, 64 samples)
it takes 10.9 s against 23.3 s for "exact" on a 2-core AVX-512 EPYC, and ranks the pairs as well
for the ILP: allocations solved from either, at 11 weight budgets, come within the same 1.8% (mean
0.38% and 0.35%) of those solved from exact values on all 256 evaluation samples
(benchmarks/sensitivity.py). Memory: about twice the exact path's (the gradients it keeps). Models where it
cannot apply (a node that modifies a tensor in place other than a module's own `inplace` flag, a
non-tensor value a layer changes) are measured exactly instead (`Sensitivity.note` says why).

"exact": the measure itself. A layer quantized alone changes nothing computed before its first
call, so per batch the FP32 graph is run once, in layer order, keeping only the values live across
the next cut, and for each layer every choice re-runs only the nodes from that layer's call onward,
fed the cached FP32 values. The traced graph calls the evaluator's own submodules, so its weight
swaps and forward hooks (activation quantizers, bias corrections) apply unchanged. A model that
cannot be traced, or whose trace does not reach every hook point or does not reproduce the FP32
outputs, is measured with whole forward passes instead (`Sensitivity.path`, either method).
Cost: about (pairs x average suffix share x samples) forward passes of one sample; for
mobilenet_v2 the suffix averages ~40% of the network.

The default sample count (DEFAULT_SAMPLES = 64) was chosen on mobilenet_v2 (583 pairs): allocations
solved (mpsearch.engine.ilp) from 64-sample sensitivities came within ~4% of the optimum under
256-sample ones (16 samples: up to ~45%, 128: under 1%). Pass `batches` for more.

Disk cache: `cache_dir / f"sensitivity-{key}.json"`, key = hash of the evaluator's cache key, the
number of batches, the measure and the method; values found there are reused, new ones merged in
atomically (for "exact" every CHUNK_PAIRS pairs, so an interrupted measurement resumes where it
stopped).
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
    "DEFAULT_METHOD",
    "DEFAULT_SAMPLES",
    "METHODS",
    "Sensitivity",
    "cache_path",
    "default_batches",
    "measure_sensitivity",
    "pair_name",
    "parse_pair",
]

CACHE_VERSION = 3  # 3: the method is part of the key
METHODS = ("fisher", "exact")
DEFAULT_METHOD = "fisher"
PROBES = 2  # random projections per sample of the "fisher" method (see the module doc)
PROBE_SEED = 0
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
    path: how the measured values were computed: "fisher" (the second-order estimate), "suffix"
        (exact, on the traced graph, re-running only the layers after the quantized one), "full"
        (exact, whole forward passes) or "cache" (none measured).
    note: why a slower path than the method asked for was taken.
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


def cache_path(evaluator: Evaluator, cache_dir: str | Path, batches: int, measure: str,
               method: str = DEFAULT_METHOD) -> Path:
    """The JSON file holding sensitivities for this evaluator, batch count, measure and method."""
    ident = f"mpsearch-sensitivity/{CACHE_VERSION}/{evaluator.cache_key()}/{batches}/{measure}/{method}"
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
    method: str = DEFAULT_METHOD,
    probes: int = PROBES,
) -> Sensitivity:
    """Sensitivity of every (layer, choice) in `options` (see the module doc).

    batches: leading evaluation batches to use (None: enough for DEFAULT_SAMPLES samples).
    cache_dir: where the JSON cache lives (None: no disk cache).
    progress: a tqdm bar on stderr over the (layer, choice) pairs measured.
    suffix: False forces whole forward passes (the slower exact path, either method).
    method: "fisher" (the second-order estimate) or "exact" (see the module doc).
    probes: random projections per sample of the "fisher" method.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise InvalidConfigError(f"sensitivity method {method!r} is not one of {', '.join(METHODS)}")
    if probes < 1:
        raise InvalidConfigError(f"probes must be at least 1, got {probes}")
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
    path = cache_path(evaluator, cache_dir, batches, measure, method) if cache_dir is not None else None
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
    if runner is not None:  # in layer order, so that each chunk's FP32 prefix stops early
        todo.sort(key=lambda fc: runner.cuts[fc[0]])
    fisher = None
    if runner is not None and method == "fisher":
        fisher, note = _FisherRunner.build(runner, evaluator, todo, measure, probes)
    how = "fisher" if fisher is not None else "suffix" if runner is not None else "full"
    bar = tqdm(total=len(todo), desc="layer sensitivity", unit="pair", file=sys.stderr, disable=not progress)
    try:
        if fisher is not None:
            try:
                _measure(fisher, evaluator, measure, todo, batches, len(todo), values, path, bar)
            except _NotApplicable as e:  # found on the first batch: measure exactly instead
                how, note = "suffix", str(e)
                bar.reset()
        if how != "fisher":
            _measure(runner, evaluator, measure, todo, batches, CHUNK_PAIRS, values, path, bar)
    finally:
        evaluator.restore()
        bar.close()
    seconds = time.perf_counter() - start
    return Sensitivity(measure, values, seconds, from_cache, batches, how, note)


def _measure(runner, evaluator, measure, todo, batches, chunk, values, path, bar) -> None:
    """Measure `todo` with `runner` (None: whole forward passes) into `values`, `chunk` pairs at a
    time, each chunk merged into the disk cache at `path` (so an interrupted run resumes there)."""
    for i in range(0, len(todo), chunk):
        acc = _Accumulator(evaluator, measure, todo[i : i + chunk], batches)
        if runner is not None:
            runner.run(acc, bar)
        else:
            _run_full(evaluator, acc, batches, bar)
        for (fqn, c), v in acc.values().items():
            values[fqn][c] = v
        if path is not None:
            _write_cache(path, measure, batches, values)


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

    def add_estimate(self, fqn: str, c: LayerChoice, total: float) -> None:
        """Add one batch's summed estimate: of the KL (nats) or of the output noise energy."""
        if not math.isfinite(total):
            raise EvaluationError(f"layer {fqn} at {pair_name(c)}: the sensitivity estimate is not finite")
        self.sums[(fqn, c)] += total

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


class _NotApplicable(Exception):
    """The "fisher" estimate does not apply to this model (the message says why)."""


class _FisherRunner:
    """The "fisher" method (see the module doc) on a traced graph.

    Per pair (layer, choice): `start` (the layer's cut: its first node), `end` (the last node that
    calls a module the pair quantizes: the layer, its input's quantizer, the outputs the deployed
    graph quantizes), `live`, the nodes in start..end whose values are used after `end`: the only
    values through which the pair changes the output, and `quantized`: live node -> the layer
    whose input quantizer the pair turns on there. The last is a shortcut: where the pair's last
    node is a Conv/Linear layer that sees the pair only through its input quantizer (the next
    layer's int8 input, say) and is that input's only user, the segment stops before it, and the
    change at its input, Q(x') - x, is projected on the gradient there (the layer is linear in its
    input, so that is what it passes on).
    """

    def __init__(self, suffix: _SuffixRunner, segments: dict, measure: str, probes: int):
        self.s = suffix
        self.segments = segments
        self.measure = measure
        self.probes = probes
        nodes = suffix.nodes
        self.live = list(dict.fromkeys(n for _, _, live, _ in segments.values() for n in live))
        # the FP32 values a pair's nodes read from before its start, and the live values
        keep: set[torch.fx.Node] = set(self.live)
        for start, end, _, _ in segments.values():
            for i in range(start, end + 1):
                keep.update(a for a in nodes[i].all_input_nodes if suffix.index[a] < start)
        self.keep = keep

    @classmethod
    def build(cls, suffix: _SuffixRunner, evaluator: Evaluator, todo: list[tuple[str, LayerChoice]],
              measure: str, probes: int) -> tuple[_FisherRunner | None, str]:
        """The runner, or None and why the pairs must be measured exactly."""
        for i, node in enumerate(suffix.nodes):
            if i in suffix.mutates and not (node.op == "call_module" and hasattr(suffix.modules[node.target], "inplace")):
                return None, f"the traced graph modifies a tensor in place ({node.name})"
        calls: dict[int, int] = {}  # id of a module -> the last node calling it
        n_calls: dict[int, int] = {}
        for i, node in enumerate(suffix.nodes):
            if node.op == "call_module":
                calls[id(suffix.modules[node.target])] = i
                n_calls[id(suffix.modules[node.target])] = n_calls.get(id(suffix.modules[node.target]), 0) + 1
        modules = dict(evaluator.model.named_modules())
        segments = {}
        for fqn, c in todo:
            plan = evaluator.plan(alone(evaluator, fqn, c))
            h = evaluator.handles[fqn]
            hooked = [h.module, *(modules[m] for m in plan.sim_outputs)]
            if h.input_module is not None:
                hooked.append(h.input_module)
            start = suffix.cuts[fqn]
            # the layers whose input quantizer alone the pair turns on: the shortcut may apply
            only_input = {}
            for f in plan.sim_inputs:
                m = evaluator.handles[f].input_module
                if m is not None and m not in hooked:
                    only_input[id(m)] = f
            end = max((calls.get(id(m), start) for m in hooked if m is not None), default=start)
            tail = {}
            for i in sorted((calls[k] for k in only_input if k in calls), reverse=True):
                node = suffix.nodes[i]
                f = only_input[id(suffix.modules[node.target])]
                arg = node.args[0] if len(node.args) == 1 and not node.kwargs else None
                if i > end and isinstance(arg, torch.fx.Node) and cls._linear_input(evaluator.handles[f]) \
                        and n_calls[id(suffix.modules[node.target])] == 1 and list(arg.users) == [node]:
                    tail[i] = (arg, f)
                else:
                    end = max(end, i)
                    break
            quantized = {arg: f for i, (arg, f) in tail.items() if i > end}
            end = max([end, *(suffix.index[a] for a in quantized)])
            live = [n for n in suffix.nodes[start : end + 1] if any(suffix.index[u] > end for u in n.users)]
            live += [a for a in quantized if a not in live]
            segments[(fqn, c)] = (start, end, live, quantized)
        return cls(suffix, segments, measure, probes), ""

    @staticmethod
    def _linear_input(handle) -> bool:
        """The layer's module is linear in the one input its quantizer changes (Conv, Linear)."""
        m = handle.input_module
        return (m is handle.module and isinstance(m, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
                and handle.input_arg in (0, "input") and not handle.other_input_args)

    def _probe(self, out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A random r with E[r r^T] the output's metric: diag(p) - p p^T (softmax p) for KL, I else."""
        eps = torch.randint(0, 2, out.shape, generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1
        if self.measure != KL:
            return eps.to(out.dtype)
        p = torch.softmax(out.detach().double(), dim=-1)
        sp = p.sqrt()
        return (sp * eps - p * (sp * eps).sum(-1, keepdim=True)).to(out.dtype)

    def _fp32_pass(self, inputs: Any, gen: torch.Generator):
        """The FP32 values to keep and, per probe, the gradient of r . output at each live value."""
        s = self.s
        env = s._bind(inputs)
        with torch.enable_grad():
            out = None
            for i, node in enumerate(s.nodes):
                if node.op == "output":
                    out = torch.fx.node.map_arg(node.args[0], env.__getitem__)
                    break
                if node.op != "placeholder":
                    env[node] = s._node(node, env)
                v = env[node]
                # a float value computed from nothing that needs a gradient (the input, an
                # embedding of token ids) starts the gradients' graph
                if node.op != "get_attr" and isinstance(v, torch.Tensor) and v.is_floating_point() \
                        and not v.requires_grad:
                    env[node] = v.detach().requires_grad_(True)
                for dead in s.dies[i]:
                    if dead not in self.keep:
                        env.pop(dead, None)
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise _NotApplicable(f"the model's output is a {type(out).__name__}, not a float tensor")
            live = [n for n in self.live if isinstance(env[n], torch.Tensor) and env[n].requires_grad]
            per_probe = [
                torch.autograd.grad(out, [env[n] for n in live], grad_outputs=self._probe(out, gen),
                                    retain_graph=k < self.probes - 1, allow_unused=True)
                for k in range(self.probes)
            ]
        # live value -> (channels-last order, its gradients per probe as (batch, elements) views);
        # None: the output does not depend on it
        grads = {}
        for n, g in zip(live, zip(*per_probe), strict=True):
            nhwc = g[0] is not None and _nhwc(g[0])
            grads[n] = None if g[0] is None else (nhwc, [_flat(x, nhwc) for x in g])
        kept = {n: (env[n].detach() if isinstance(env[n], torch.Tensor) else env[n]) for n in self.keep}
        return kept, grads

    def run(self, acc: _Accumulator, bar) -> None:
        s = self.s
        inplace = [m for m in s.modules.values() if getattr(m, "inplace", False) is True]
        params = [p for p in s.gm.parameters() if p.requires_grad]  # gradients of values only
        gen = torch.Generator().manual_seed(PROBE_SEED)
        half = 0.5 if self.measure == KL else 1.0
        done, base = 0, bar.n
        try:
            for m in inplace:  # the values autograd keeps must not change under it
                m.inplace = False
            for p in params:
                p.requires_grad_(False)
            for b, (inputs, _) in enumerate(s.ev.task.eval_batches[: s.batches]):
                fp32, grads = self._fp32_pass(inputs, gen)
                with torch.no_grad():
                    for fqn, c in acc.todo:
                        start, end, live, quantized = self.segments[(fqn, c)]
                        env = dict(fp32)
                        acc.swap_in(fqn, c)
                        try:
                            for i in range(start, end + 1):
                                env[s.nodes[i]] = s._node(s.nodes[i], env)
                        finally:
                            acc.swap_out(fqn)
                        proj = 0.0
                        for n in live:
                            new, old = env[n], fp32[n]
                            q = acc.parts[(fqn, c)][1].get(quantized[n]) if n in quantized else None
                            if q is not None:  # what the next layer sees through its input quantizer
                                new = q.fake_quant(new)
                            if n not in grads:  # a value without a gradient must not change
                                if new is not old and not (isinstance(new, torch.Tensor) and torch.equal(new, old)):
                                    raise _NotApplicable(f"layer {fqn} changes a value without a gradient ({n.name})")
                                continue
                            if grads[n] is not None:
                                nhwc, gs = grads[n]
                                d = _flat(new - old, nhwc)
                                proj = proj + torch.stack([torch.linalg.vecdot(g, d) for g in gs]).double()
                        total = half * float((proj**2).mean(0).sum()) if isinstance(proj, torch.Tensor) else 0.0
                        acc.add_estimate(fqn, c, total)
                        done += 1
                        bar.update(base + done // s.batches - bar.n)
                del fp32, grads
        finally:
            for m in inplace:
                m.inplace = True
            for p in params:
                p.requires_grad_(True)


def _nhwc(x: torch.Tensor) -> bool:
    """A channels-last activation (whose elements are in memory order as N, H, W, C)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _flat(x: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """x as (batch, elements), ordered N, H, W, C when `nhwc` (no copy for channels-last x), else
    in its logical order (two tensors flattened with the same `nhwc` have matching elements)."""
    return (x.permute(0, 2, 3, 1) if nhwc else x).reshape(x.shape[0], -1)


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
