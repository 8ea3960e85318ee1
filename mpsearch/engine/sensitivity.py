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
with torch.fx; per FISHER_CHUNK samples one FP32 forward and a few backward passes give, at every
tensor a quantized layer changes, the gradient g of a random projection r of the output, with
E[r r^T] the output's Fisher metric (diag(p) - p p^T of the softmax for KL, the identity for the
normalized MSE). Each pair then re-runs only its own few nodes (the layer and the quantizers the
deployed graph puts around it) to get the change d it makes there, and the estimate is the mean
over probes of (g . d)^2 (for KL halved): KL(p || q) = 1/2 dz^T (diag(p) - p p^T) dz + O(|dz|^3)
for a change dz of the logits, and E[(r^T J d)^2] = d^T J^T E[r r^T] J d. The pairs of one layer
share the projection of their changes on the gradients.

Where the noise goes (classifiers, see _FisherRunner._plan and _probes): a sample's estimate
scales with the trace of its metric, sum p (1 - p), so a confident prediction contributes little.
By default the samples come from a pool of FISHER_POOL x DEFAULT_SAMPLES (128), of which about
half are kept, the uncertain ones surely and the others with a chance in proportion to their trace
(weighted by its inverse: unbiased), and the probes, PROBES per kept sample on average, go where
the trace is. A sample's probes share one random sign vector over the classes, multiplied by the
columns of a Walsh-Hadamard matrix, the classes taken in order of their share of the trace: each
probe alone is unbiased, and the cross terms of the top classes cancel exactly. The draws are
seeded (PROBE_SEED), so the estimate is reproducible.

On mobilenet_v2 (weights int8/int4/int2, 159 pairs) it takes 7.3 s against 28.9 s for "exact"
on its 64 samples (4.0x, a 2-core AVX-512 EPYC), and ranks the pairs at least as well for the
ILP: allocations solved from either at 41 weight budgets come within 2.9% at most (mean 0.25%;
over five seeds at most 1.7-4.2%, mean 0.30%) and 4.8% (mean 0.46%) of those solved from exact
values on all 256 evaluation samples (benchmarks/sensitivity.py). Peak memory: 1.9 GB against
the exact path's 1.4 GB (the FP32 pass runs a few samples at a time). Models where it cannot
apply (a node that modifies a tensor in place other than a module's own `inplace` flag, a
non-tensor value a layer changes) are measured as if "exact" had been asked for: on
its samples, from and into its cache (`Sensitivity.note` says why).

"exact": the measure itself. A layer quantized alone changes nothing computed before its first
call, so per batch the FP32 graph is run once, in layer order, keeping only the values live across
the next cut, and for each layer every choice re-runs only the nodes from that layer's call onward,
fed the cached FP32 values. The traced graph calls the evaluator's own submodules, so its weight
swaps and forward hooks (activation quantizers, bias corrections) apply unchanged. A model that
cannot be traced, or whose trace does not reach every hook point or does not reproduce the FP32
outputs, is measured with whole forward passes instead (`Sensitivity.path`, either method).
Cost: about (pairs x average suffix share x samples) forward passes of one sample; for
mobilenet_v2 the suffix averages ~40% of the network.

The default sample count (DEFAULT_SAMPLES = 64) was chosen on mobilenet_v2 (583 pairs) for
"exact": allocations solved (mpsearch.engine.ilp) from 64-sample sensitivities came within ~4% of
the optimum under 256-sample ones (16 samples: up to ~45%, 128: under 1%). Pass `batches` for
more (for "fisher", a larger pool: it keeps half of it, or all of it up to DEFAULT_SAMPLES).

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx
from tqdm import tqdm

from hw_models import Candidate, LayerChoice, Precision
from mpsearch import metrics
from mpsearch.cache import atomic_write_bytes
from mpsearch.defaults import DEFAULT_SENSITIVITY, SENSITIVITY_METHODS
from mpsearch.errors import EvaluationError, InvalidConfigError
from mpsearch.results.records import dumps_strict
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks.base import concat_batches, run_model, take_samples

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

CACHE_VERSION = 4  # 3: the method is part of the key; 4: fisher samples by importance, stratified probes
METHODS = SENSITIVITY_METHODS
DEFAULT_METHOD = DEFAULT_SENSITIVITY
PROBES = 2  # random projections per sample (average) of the "fisher" method (see the module doc)
PROBE_SEED = 0
FISHER_CHUNK = 4  # samples per FP32 and backward pass of "fisher" (see the module doc)
DEFAULT_SAMPLES = 64  # batches=None: the first batches holding at least this many samples
FISHER_POOL = 2  # batches=None, "fisher" on a classifier: FISHER_POOL x DEFAULT_SAMPLES, about half used
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

    batches: leading evaluation batches to use (None: enough for DEFAULT_SAMPLES samples; for
        "fisher" on a classifier FISHER_POOL times as many, about half of them used).
    cache_dir: where the JSON cache lives (None: no disk cache).
    progress: a tqdm bar on stderr over the (layer, choice) pairs measured.
    suffix: False forces whole forward passes (the slower exact path, either method).
    method: "fisher" (the second-order estimate) or "exact" (see the module doc).
    probes: random projections per sample of the "fisher" method (on average).
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise InvalidConfigError(f"sensitivity method {method!r} is not one of {', '.join(METHODS)}")
    if probes < 1:
        raise InvalidConfigError(f"probes must be at least 1, got {probes}")
    n_eval = len(evaluator.task.eval_batches)
    measure = KL if evaluator.task.kind == "classifier" else NMSE
    given_batches = batches
    if batches is None:
        pool = FISHER_POOL if method == "fisher" and suffix and measure == KL else 1
        batches = default_batches(evaluator, pool * DEFAULT_SAMPLES)
    elif not 1 <= batches <= n_eval:
        raise InvalidConfigError(f"batches must be between 1 and {n_eval}, got {batches}")
    unknown = [f for f in options if f not in evaluator.handles]
    if unknown:
        raise InvalidConfigError(f"no quantizable layer named {', '.join(unknown)}")

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
    if method == "fisher" and fisher is None:
        return _as_exact(evaluator, options, given_batches, cache_dir, progress, suffix, note, start)
    how = "fisher" if fisher is not None else "suffix" if runner is not None else "full"
    bar = tqdm(total=len(todo), desc="layer sensitivity", unit="pair", file=sys.stderr, disable=not progress)
    try:
        try:
            _measure(fisher or runner, evaluator, measure, todo, batches, len(todo) if fisher else CHUNK_PAIRS,
                     values, path, bar)
        except _NotApplicable as e:  # fisher finds it on the first batch, before anything is cached
            note = str(e)
        else:
            return Sensitivity(measure, values, time.perf_counter() - start, from_cache, batches, how, note)
    finally:
        evaluator.restore()
        bar.close()
    return _as_exact(evaluator, options, given_batches, cache_dir, progress, suffix, note, start)


def _as_exact(evaluator, options, batches, cache_dir, progress, suffix, note, start) -> Sensitivity:
    """Where "fisher" cannot apply: the "exact" method as if asked for, on its own samples and
    cache (not fisher's larger pool); `note` says why, `seconds` counts the attempt too."""
    exact = measure_sensitivity(evaluator, options, batches=batches, cache_dir=cache_dir, progress=progress,
                                suffix=suffix, method="exact")
    return replace(exact, seconds=time.perf_counter() - start, note=note)


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

    def _plan(self, ref: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Which samples the estimate uses and how many probes each gets, from the FP32 outputs
        `ref`: (probes per sample, 0 for a sample left out; each sample's weight).

        For KL the estimate of a sample scales with the trace t of its output metric,
        sum p (1 - p): a confident prediction barely moves. From a pool larger than
        DEFAULT_SAMPLES an expected half (at least DEFAULT_SAMPLES) is kept, sample i with
        probability pi_i = min(1, t_i / tau) and weight 1 / pi_i (unbiased), and the probes go in
        proportion to max(t_i, tau), rounded to powers of two (for _probes' sign patterns): about
        `probes` per kept sample on average. Else every sample, `probes` probes each."""
        n = ref.shape[0]
        p = torch.softmax(ref.double(), dim=-1)
        t = (p * (1 - p)).sum(-1)
        if self.measure != KL or not float(t.sum()) > 0:
            return torch.full((n,), self.probes, dtype=torch.int64), torch.ones(n, dtype=torch.float64)
        keep = max(DEFAULT_SAMPLES, n // 2)
        pi, tau = torch.ones(n, dtype=torch.float64), 0.0
        if keep < n:  # the tau with sum(min(1, t / tau)) = keep, by bisection
            lo, hi = 0.0, float(t.sum())
            for _ in range(100):
                tau = (lo + hi) / 2
                lo, hi = (tau, hi) if float(torch.clamp(t / tau, max=1).sum()) > keep else (lo, tau)
            tau = hi
            pi = torch.clamp(t / tau, max=1)
        kept = torch.rand(n, generator=gen, dtype=torch.float64) < pi
        share = torch.clamp(t, min=tau)
        counts = torch.clamp(share / share[kept].sum() * (self.probes * int(kept.sum())), min=1)
        counts = 2 ** torch.round(torch.log2(counts))
        return torch.where(kept, counts, 0).long(), torch.where(kept, 1 / pi, 0.0)

    def _probes(self, out: torch.Tensor, gen: torch.Generator, counts: torch.Tensor,
                weight: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Vectors r_k (k < the largest count; row i zero where k >= counts[i]) and per-sample
        weights w_k = weight / counts (0 there), with sum_k w_k E[r_k r_k^T] = weight times the
        output's metric, row by row.

        KL: r = (diag(sqrt p) - p sqrt(p)^T) s for a random sign vector s over the classes. A
        sample's counts[i] (a power of two) sign vectors are one random s times the columns of a
        Walsh-Hadamard matrix H: s_k[j] = s[j] H[k, rank(j) mod counts[i]], rank(j) the class's
        place by its share of the metric's trace. Each s_k is uniformly random, so each probe is
        unbiased, but the cross terms of classes with different ranks mod counts[i] cancel exactly
        over the probes: the largest (the top classes') never enter the estimate's noise."""
        kmax = int(counts.max())
        rows = [(counts > k).to(torch.float64) for k in range(kmax)]
        weights = [r / counts.clamp(min=1) * weight for r in rows]
        if self.measure != KL:  # the identity metric: independent random signs
            return [(_signs(out.shape, gen) * r[:, None]).to(out.dtype) for r in rows], weights
        signs = _signs(out.shape, gen)
        p = torch.softmax(out.detach().double(), dim=-1)
        sp = p.sqrt()
        share = p * ((1 - p) ** 2 + (p**2).sum(-1, keepdim=True) - p**2)  # |row j of the metric's root|^2
        col = torch.argsort(torch.argsort(share, dim=-1, descending=True), dim=-1) % counts.clamp(min=1)[:, None]
        vectors = []
        for k, r in enumerate(rows):
            # Sylvester's H[k, c] = (-1)^popcount(k & c): its top-left P x P block is the order-P matrix
            parity = sum(((col >> b) & 1) for b in range(kmax.bit_length()) if k >> b & 1)
            e = signs * (1 - 2 * (torch.as_tensor(parity) % 2)) * r[:, None]
            vectors.append((sp * e - p * (sp * e).sum(-1, keepdim=True)).to(out.dtype))
        return vectors, weights

    def _fp32_pass(self, inputs: Any, gen: torch.Generator, counts: torch.Tensor, weight: torch.Tensor):
        """The FP32 values to keep, per probe the gradient of r . output at each live value, and the
        probes' per-sample weights (probes, samples)."""
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
            vectors, weights = self._probes(out, gen, counts, weight)
            per_probe = [
                torch.autograd.grad(out, [env[n] for n in live], grad_outputs=r,
                                    retain_graph=k < len(vectors) - 1, allow_unused=True)
                for k, r in enumerate(vectors)
            ]
        # live value -> its gradient per probe as (samples, elements), the elements in the order
        # _flat gives its changes; None: the output does not depend on it
        grads = {}
        for n, g in zip(live, zip(*per_probe), strict=True):
            nhwc = _nhwc(env[n])
            grads[n] = None if g[0] is None else [_flat(x, nhwc) for x in g]
        kept = {n: (env[n].detach() if isinstance(env[n], torch.Tensor) else env[n]) for n in self.keep}
        return kept, grads, torch.stack(weights)

    def run(self, acc: _Accumulator, bar) -> None:
        s = self.s
        inplace = [m for m in s.modules.values() if getattr(m, "inplace", False) is True]
        params = [p for p in s.gm.parameters() if p.requires_grad]  # gradients of values only
        gen = torch.Generator().manual_seed(PROBE_SEED)
        counts, weight = self._plan(torch.cat(s.ev.reference_outputs[: s.batches]), gen)
        chunks = _chunks([x for x, _ in s.ev.task.eval_batches[: s.batches]], counts, FISHER_CHUNK)
        # the pairs of one layer whose segments end in the same live values share one projection
        groups: dict[tuple, list[tuple[str, LayerChoice]]] = {}
        for fqn, c in acc.todo:
            _, _, live, quantized = self.segments[(fqn, c)]
            groups.setdefault((fqn, tuple(live), tuple(quantized)), []).append((fqn, c))
        done, base = 0, bar.n
        try:
            for m in inplace:  # the values autograd keeps must not change under it
                m.inplace = False
            for p in params:
                p.requires_grad_(False)
            for inputs, idx in chunks:
                fp32, grads, weights = self._fp32_pass(inputs, gen, counts[idx], weight[idx])
                with torch.no_grad():
                    for (fqn, live, _), group in groups.items():
                        # the changes of the group's pairs at each live value, (samples, pairs, elements)
                        d = {}
                        for j, pair in enumerate(group):
                            for n, new, old in self._changes(acc, pair, fp32, grads):
                                if n not in d:
                                    d[n] = new.new_empty(new.shape[0], len(group), new.shape[1])
                                torch.sub(new, old, out=d[n][:, j])
                        # proj[j, k, i]: sum over live values of (gradient of probe k) . (change of pair j), sample i
                        proj = torch.zeros(len(group), *weights.shape, dtype=torch.float64)
                        for n, dn in d.items():
                            dt = dn.transpose(1, 2)
                            for k, g in enumerate(grads[n]):
                                proj[:, k] += torch.bmm(g.unsqueeze(1), dt)[:, 0].T.double()
                        totals = (weights * proj**2).sum((1, 2)) * (0.5 if self.measure == KL else 1.0)
                        for pair, total in zip(group, totals.tolist(), strict=True):
                            acc.add_estimate(*pair, total)
                        done += len(group)
                        bar.update(base + done // len(chunks) - bar.n)
                del fp32, grads
        finally:
            for m in inplace:
                m.inplace = True
            for p in params:
                p.requires_grad_(True)

    def _changes(self, acc: _Accumulator, pair: tuple[str, LayerChoice], fp32: dict, grads: dict):
        """Re-run the pair's segment on the FP32 values: (live value, its new and FP32 values as
        (samples, elements), in the order of its gradients) for each live value with a gradient
        (those without one must not change)."""
        s = self.s
        fqn, c = pair
        start, end, live, quantized = self.segments[pair]
        env = dict(fp32)
        acc.swap_in(fqn, c)
        try:
            for i in range(start, end + 1):
                env[s.nodes[i]] = s._node(s.nodes[i], env)
        finally:
            acc.swap_out(fqn)
        for n in live:
            new, old = env[n], fp32[n]
            q = acc.parts[pair][1].get(quantized[n]) if n in quantized else None
            if q is not None:  # what the next layer sees through its input quantizer
                new = q.fake_quant(new)
            if n not in grads:
                if new is not old and not (isinstance(new, torch.Tensor) and torch.equal(new, old)):
                    raise _NotApplicable(f"layer {fqn} changes a value without a gradient ({n.name})")
            elif grads[n] is not None:
                nhwc = _nhwc(old)
                yield n, _flat(new, nhwc), _flat(old, nhwc)


def _chunks(batches: Sequence[Any], counts: torch.Tensor, size: int) -> list[tuple[Any, torch.Tensor]]:
    """(inputs, their indices among the batches' samples) of up to `size` samples each: the kept
    samples (counts > 0) in descending order of counts, so that a chunk's samples need about as
    many backward passes; across batches where their tensors concatenate (equal shapes but the
    first), else batch by batch (token batches padded each to its own longest)."""
    tensors = [b if isinstance(b, tuple) else (b,) for b in batches]
    sizes = [t[0].shape[0] for t in tensors]
    if len({tuple(x.shape[1:] for x in t) for t in tensors}) == 1:
        groups = [(concat_batches(batches), torch.arange(sum(sizes)))]
    else:
        index = torch.arange(sum(sizes)).split(sizes)
        groups = list(zip(batches, index, strict=True))
    out = []
    for batch, index in groups:
        order = index[torch.argsort(counts[index], descending=True, stable=True)]
        order = order[counts[order] > 0]
        for lo in range(0, len(order), size):
            idx = order[lo : lo + size]
            out.append((take_samples(batch, idx - index[0]), idx))
    return out


def _signs(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Independent random +1/-1 (float64)."""
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1


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
