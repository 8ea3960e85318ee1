"""Real CPU latency of mixed-precision configurations in ONNX Runtime.

A configuration is the set of quantizable layers that run in int8 (int8 weights and int8
activations, the evaluator's own quantization parameters); every other layer stays FP32.
`build_session` builds the configuration's deployed graph (`mpsearch.deploy.build`: the graph
`mpsearch export --format onnx` writes) and opens an ONNX Runtime CPU session on it.

What is measured. End to end (`time_interleaved`): the wall time of one
`InferenceSession.run` on one batch, feeds prepared beforehand, the output copied back as
NumPy, in the graph ONNX Runtime's optimizer made (ORT_ENABLE_ALL: fused activations, NCHWc
convolutions for FP32, QLinearConv / QGemm for int8 groups). Per layer (`profile_layers`):
ONNX Runtime's own kernel times from its profiler (see `profile_layers` for what is attributed
to a layer). Every session runs with the sequential executor, one inter-op thread and a fixed
number of intra-op threads (default 1): latency on a shared, multi-core machine depends on the
thread count far more than on anything measured here.

Drift. On a shared machine latency drifts (10 % and more within minutes), which swamps the
differences between configurations when they are timed one after the other. `time_interleaved`
times all configurations in rounds, each one bracketed by runs of a reference configuration, and
reports ratios to the reference, which cancel drift that is slow compared with a few runs.
`profile_layers` takes the median over its profiled runs; its per-layer times are meant to be
compared within one session (shares of the total), or across sessions profiled close together.

What runs. In the deployed graph an int8 convolution's output is quantized, so ONNX Runtime
runs every int8 layer as an int8 kernel (QLinearConv, QGemm), residual Adds and poolings
between int8 tensors as QLinearAdd / QLinearGlobalAveragePool, and a boundary between int8 and
FP32 layers as one QuantizeLinear or DequantizeLinear (and a layout Transpose: int8 kernels run
NHWC, FP32 convolutions NCHWc). `OrtRunner.int8_kernels` counts the int8 kernels (one per int8
layer) and `LayerProfile.kernels` names each layer's ops.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hw_models import Candidate, LayerChoice, Precision
from mpsearch.errors import MpsearchError
from mpsearch.onnx_export import (
    OrtRunner,
    import_onnx,
    import_ort,
    scope_fqn,
    session_options,
)
from mpsearch.scoring.analysis import ModelAnalysis
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks.base import Batch, Task

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = [
    "ConfigRunner",
    "LayerProfile",
    "attribute_nodes",
    "build_session",
    "config_candidate",
    "layer_latencies",
    "profile_layers",
    "time_interleaved",
    "timing_number",
]

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Source-graph ops that carry a layer's weight (as mpsearch.onnx_export finds layers).
_LAYER_OPS = ("Conv", "Gemm", "MatMul")
# Nodes a weight or bias may pass through on its way to the layer's node in the exported graph.
_PASS_THROUGH = ("Identity", "Transpose", "DequantizeLinear", "Cast")
_KERNEL_SUFFIX = "_kernel_time"

# Value names mpsearch.deploy.build / the TorchScript exporter give a layer's weight and bias
# ("features.0.weight", "features.0.weight_quantized", "features.0.bias_dequantized_1", ...).
_WEIGHT_NAME = re.compile(r"^(?P<fqn>.+)\.weight(?:_quantized|_dequantized)?(?:_\d+)?$")
_BIAS_NAME = re.compile(r"^(?P<fqn>.+)\.bias(?:_quantized|_dequantized)?(?:_\d+)?$")
# The QuantizeLinear / DequantizeLinear mpsearch.deploy.build puts on a layer's input (and before the
# reshapes that feed it): node "/<fqn>.input_quantized/QuantizeLinear", output
# "<fqn>.input_quantized", "<fqn>.input_source_dequantized", ...
_INPUT_QDQ_NODE = re.compile(
    r"^/(?P<fqn>.+)\.input(?:_source)?_(?:quantized|dequantized)(?:_\d+)?/(?:Quantize|Dequantize)Linear(?:_\d+)?$"
)
_INPUT_QDQ_VALUE = re.compile(r"^(?P<fqn>.+)\.input(?:_source)?_(?:quantized|dequantized)(?:_\d+)?$")


# -- configurations -----------------------------------------------------------------------------
def config_candidate(analysis: ModelAnalysis, int8: Collection[str], evaluator: Evaluator | None = None) -> Candidate:
    """The candidate of a configuration: INT8 weights and INT8 input activations on the layers
    in `int8` (an FP32 input where the layer's input cannot be hooked:
    `handles[fqn].input_module is None`, the evaluator's handles when given), FP32/FP32 elsewhere.
    Raises ValueError for a name that is not a quantizable layer of `analysis`."""
    if isinstance(int8, str):
        raise TypeError("int8 is a collection of layer names, not one name")
    int8 = set(int8)
    unknown = sorted(int8 - set(analysis.fqns))
    if unknown:
        raise ValueError(f"not quantizable layers of the model: {', '.join(unknown)}")
    handles = evaluator.handles if evaluator is not None else analysis.handles
    fp32 = LayerChoice(Precision.FP32, Precision.FP32)

    def choice(fqn: str) -> LayerChoice:
        if fqn not in int8:
            return fp32
        act = Precision.INT8 if handles[fqn].input_module is not None else Precision.FP32
        return LayerChoice(Precision.INT8, act)

    return Candidate((fqn, choice(fqn)) for fqn in analysis.fqns)


class ConfigRunner(OrtRunner):
    """An OrtRunner of one configuration's deployed graph (`mpsearch.deploy.build`), made by
    `build_session`.

    Besides OrtRunner's attributes: `model` (the deployed QDQ graph, before ORT's optimizer),
    `candidate` (the configuration as a Candidate, for `Evaluator.outputs`), `int8` (the layers
    asked for in int8), `weight_dtype` (int8 or uint8 weight integers) and `deployment` (the
    mpsearch.deploy.build.Deployment: plan, weight storage, notes).
    """

    def __init__(self, deployment, threads: int | None):
        super().__init__(deployment.proto, threads=threads)
        self.deployment = deployment
        self.model = deployment.proto
        self.candidate = deployment.candidate
        self.int8 = frozenset(f for f, c in self.candidate.items() if c.weight == Precision.INT8)
        self.weight_dtype = deployment.weight_dtype


def build_session(
    task: Task,
    analysis: ModelAnalysis,
    evaluator: Evaluator,
    int8: Collection[str],
    threads: int | None = 1,
    *,
    weight_dtype: str = "auto",
) -> ConfigRunner:
    """An ONNX Runtime session of the deployed graph of the configuration with exactly the layers
    in `int8` at int8 weights and activations (`config_candidate`), every other layer FP32: the
    graph `mpsearch export --format onnx` writes for it (mpsearch.deploy.build), with the
    evaluator's integers and quantization parameters.

    threads: intra-op threads (fixed; None: ONNX Runtime's default). weight_dtype: "auto"
    (`onnx_export.default_weight_dtype`), "int8" or "uint8".
    """
    from mpsearch.deploy.build import build

    candidate = config_candidate(analysis, int8, evaluator)
    return ConfigRunner(build(evaluator, candidate, weight_dtype=weight_dtype), threads)


# -- end-to-end latency -------------------------------------------------------------------------
# Each timing is the median of at least this many back-to-back runs, and of enough runs to last
# MIN_TIMING_S: the reference, timed twice as often, would otherwise run with warmer caches than
# the configuration it is compared with, and a run of tens of microseconds is mostly timer noise.
TIMING_NUMBER = 3
MIN_TIMING_S = 2e-3


def timing_number(runner: OrtRunner, batch: Batch) -> int:
    """Back-to-back runs per timing (`time_interleaved`'s `number`) for this model: at least
    TIMING_NUMBER, and enough to last MIN_TIMING_S."""
    t = sorted(runner.time_batch(batch, repeats=3, warmup=True))[1]
    return max(TIMING_NUMBER, math.ceil(MIN_TIMING_S / max(t, 1e-7)))


def _time_once(runner: OrtRunner, batch: Batch, number: int) -> float:
    times = runner.time_batch(batch, repeats=number, warmup=False)
    return statistics.median(times)


def time_interleaved(
    runners: Mapping[str, OrtRunner],
    batch: Batch,
    *,
    rounds: int = 7,
    reference: str,
    number: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Latency in seconds of each runner on one batch, interleaved to cancel drift.

    Method. Every runner runs once untimed (warm-up). Then, in each of `rounds` rounds, the
    runners other than the reference are taken in an order shuffled per round (random.Random
    seeded with `seed`), and each is timed right between two timings of the reference:
    ref, A, ref, B, ref, C, ref (so n + 1 reference timings per round). A runner's ratio in a
    round is its time over the mean of the two reference times around it. The result is, for the
    reference, the median of all its timings, and for every other runner the median over rounds
    of its ratio times that reference median. Drift slower than a few runs scales both sides of a
    ratio alike and cancels; the per-round shuffle keeps a runner from always following the same
    neighbour (cache and frequency effects). One timing is the median of `number` back-to-back
    runs (`OrtRunner.time_batch` without warm-up).

    The keys are those of `runners`, in the same order. Raises ValueError when `reference` is not
    one of them or rounds / number is below 1.
    """
    if reference not in runners:
        raise ValueError(f"reference {reference!r} is not one of the runners ({', '.join(runners)})")
    if rounds < 1 or number < 1:
        raise ValueError(f"rounds and number must be at least 1, got {rounds} and {number}")
    others = [k for k in runners if k != reference]
    for r in runners.values():
        r.time_batch(batch, repeats=0, warmup=True)
    rng = random.Random(seed)
    ref_times: list[float] = []
    ratios: dict[str, list[float]] = {k: [] for k in others}
    ref = runners[reference]
    for _ in range(rounds):
        order = rng.sample(others, len(others))
        before = _time_once(ref, batch, number)
        ref_times.append(before)
        for k in order:
            t = _time_once(runners[k], batch, number)
            after = _time_once(ref, batch, number)
            ref_times.append(after)
            ratios[k].append(t / (0.5 * (before + after)))
            before = after
    ref_median = statistics.median(ref_times)
    return {k: ref_median if k == reference else statistics.median(ratios[k]) * ref_median for k in runners}


# -- which optimized node belongs to which layer -------------------------------------------------
def _match(pattern: re.Pattern, name: str, fqns: Collection[str]) -> str | None:
    m = pattern.match(name)
    return m.group("fqn") if m and m.group("fqn") in fqns else None


def _chain(name: str, producers: Mapping[str, Any]) -> list[str]:
    """`name` and the values it is computed from through Identity / Transpose / DequantizeLinear /
    Cast (data input only), up to the initializer."""
    out = [name]
    for _ in range(16):
        n = producers.get(name)
        if n is None or n.op_type not in _PASS_THROUGH:
            break
        name = n.input[0]
        out.append(name)
    return out


def _is_weight(a: np.ndarray) -> bool:
    return a.dtype.kind == "f" and a.ndim >= 2 and bool(np.any(a))


def _fingerprint(a: np.ndarray) -> np.ndarray:
    """The sorted non-zero values of a float weight: the same for any permutation or zero padding
    of it (ORT's NCHWc reordering, a transposed Gemm weight)."""
    return np.sort(a[a != 0].astype(np.float32, copy=False).ravel())


@dataclass
class _SourceInfo:
    weight_names: dict[str, str] = field(default_factory=dict)  # value name -> fqn
    bias_names: dict[str, str] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # fqn -> its float weight


def _source_info(source: onnx.ModelProto, fqns: Collection[str]) -> _SourceInfo:
    """Names (and float weight values) of each layer's weight and bias in the exported graph.

    A layer's node is a Conv / Gemm / MatMul whose weight comes from an initializer named after it
    ("<fqn>.weight", "<fqn>.weight_quantized"), else whose scope name is the layer's
    (`onnx_export.scope_fqn`: TorchScript's generated names for batch-norm-folded weights)."""
    _, nh = import_onnx()
    g = source.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {t.name: t for t in g.initializer}
    info = _SourceInfo()
    weight_owner: dict[str, set[str]] = defaultdict(set)
    bias_owner: dict[str, set[str]] = defaultdict(set)
    weights: dict[str, list[np.ndarray]] = defaultdict(list)
    for n in g.node:
        if n.op_type not in _LAYER_OPS or len(n.input) < 2:
            continue
        w_chain = _chain(n.input[1], producers)
        if w_chain[-1] not in inits:  # not a weight (attention's activation x activation MatMul)
            continue
        fqn = _match(_WEIGHT_NAME, w_chain[-1], fqns) or (
            s if (s := scope_fqn(n.name)) in fqns else None
        )
        if fqn is None:
            continue
        for v in w_chain:
            weight_owner[v].add(fqn)
        if len(n.input) > 2 and n.input[2]:
            for v in _chain(n.input[2], producers):
                bias_owner[v].add(fqn)
        if not any(producers.get(v) is not None and producers[v].op_type == "DequantizeLinear" for v in w_chain):
            w = nh.to_array(inits[w_chain[-1]])
            if _is_weight(w):
                weights[fqn].append(w)
    info.weight_names = {v: next(iter(o)) for v, o in weight_owner.items() if len(o) == 1}
    info.bias_names = {v: next(iter(o)) for v, o in bias_owner.items() if len(o) == 1}
    info.weights = {f: w[0] for f, w in weights.items() if len(w) == 1}
    return info


def _module_weights(analysis: ModelAnalysis) -> dict[str, np.ndarray]:
    out = {}
    for fqn, h in analysis.handles.items():
        w = getattr(h.module, h.param, None)
        if isinstance(w, torch.Tensor):
            a = w.detach().to(torch.float32).cpu().numpy()
            if _is_weight(a):
                out[fqn] = a
    return out


def attribute_nodes(
    optimized: onnx.ModelProto,
    analysis: ModelAnalysis,
    source: onnx.ModelProto | None = None,
) -> dict[str, str]:
    """Node name -> layer fqn for the nodes of an ORT-optimized graph that belong to a layer.

    A node belongs to layer L when (first rule that applies):
    1. it consumes a value that is L's weight: an initializer or value named "<L>.weight",
       "<L>.weight_quantized", "<L>.weight_dequantized" (optionally "_<n>"), or, with `source`
       (the graph before optimization), any value on the way from an initializer to L's
       Conv / Gemm / MatMul weight input there (generated names of folded weights). This is L's
       kernel (Conv, FusedConv, NCHWc Conv, QLinearConv, QGemm, FusedGemm, Gemm, MatMul, ...),
       and, when L stayed a float convolution on a QDQ weight, the run-time DequantizeLinear of
       its weight;
    2. no weight name, and it consumes L's bias the same way (ORT's NCHWc convolutions replace
       the weight by a reordered copy, "reorder_token_<n>", but keep the bias);
    3. it is a QuantizeLinear / DequantizeLinear that mpsearch.deploy.build put on L's input (node
       "/<L>.input_quantized/QuantizeLinear" or its output "<L>.input_quantized", also
       "input_dequantized" and the "input_source_*" pair before a Flatten), and it feeds no
       node of another layer directly (not one ORT merged for several layers);
    4. no name at all (an NCHWc convolution without bias): one of its float initializers holds
       exactly the values of L's float weight, permuted and zero-padded (sorted non-zero values
       equal), and of no other layer's. The weights compared are the source graph's when given,
       else the analysis's modules' (which, for a layer whose batch norm was folded on export,
       do not match: such a layer is left out).
    A value consumed by more than one node of the optimized graph (ORT merges equal initializers)
    or claimed by several layers is not used; a node that matches several layers under one rule
    is left out. Everything else (layout Transposes, ReorderInput/Output, Flatten, pooling,
    a standalone Add, QuantizeLinear / DequantizeLinear that no longer carry a layer's name) is
    not attributed.
    """
    fqns = set(analysis.fqns)
    g = optimized.graph
    uses = Counter(i for n in g.node for i in n.input)
    info = _source_info(source, fqns) if source is not None else _SourceInfo()

    def owners(node, table: Mapping[str, str], pattern: re.Pattern) -> set[str]:
        found = set()
        for i in node.input:
            if not i or uses[i] > 1:
                continue
            f = table.get(i) or _match(pattern, i, fqns)
            if f is not None:
                found.add(f)
        return found

    result: list[tuple[str, str | None]] = []  # (node name, layer) in graph order
    pending: list[tuple[int, Any]] = []
    by_io: list[int] = []  # positions attributed by rule 3
    for n in g.node:
        fqn = None
        for table, pattern in ((info.weight_names, _WEIGHT_NAME), (info.bias_names, _BIAS_NAME)):
            found = owners(n, table, pattern)
            if found:
                fqn = next(iter(found)) if len(found) == 1 else None
                break
        else:
            if n.op_type in _QDQ_OPS:
                fqn = _match(_INPUT_QDQ_NODE, n.name, fqns) or (
                    _match(_INPUT_QDQ_VALUE, n.output[0], fqns) if n.output else None
                )
                if fqn is not None:
                    by_io.append(len(result))
            elif len(n.input) > 1:
                pending.append((len(result), n))
        result.append((n.name, fqn))

    inits = {t.name: t for t in g.initializer}
    pending = [(pos, n) for pos, n in pending if any(i in inits and uses[i] == 1 for i in n.input[1:])]
    if pending:  # rule 4: by the values of a float weight
        _, nh = import_onnx()
        weights = {**_module_weights(analysis), **info.weights}
        nonzeros = {f: int(np.count_nonzero(w)) for f, w in weights.items()}
        prints: dict[str, np.ndarray] = {}  # computed when needed
        for pos, n in pending:
            found = set()
            for i in n.input[1:]:
                if i not in inits or uses[i] > 1:
                    continue
                a = nh.to_array(inits[i])
                if not _is_weight(a):
                    continue
                nz = int(np.count_nonzero(a))
                candidates = [f for f, c in nonzeros.items() if c == nz]
                if not candidates:
                    continue
                fp = _fingerprint(a)
                for f in candidates:
                    if f not in prints:
                        prints[f] = _fingerprint(weights[f])
                    if np.array_equal(prints[f], fp):
                        found.add(f)
            if len(found) == 1:
                result[pos] = (n.name, next(iter(found)))

    # a Q / DQ that feeds another layer's kernel directly (ORT merged equal QuantizeLinear nodes
    # of several layers: the query / key / value projections of one input) is shared: left out
    consumers: dict[str, list[int]] = defaultdict(list)
    for pos, n in enumerate(g.node):
        for i in n.input:
            consumers[i].append(pos)
    for pos in by_io:
        name, fqn = result[pos]
        fed = {result[c][1] for o in g.node[pos].output for c in consumers[o] if c not in by_io}
        if fed - {None, fqn}:
            result[pos] = (name, None)

    by_name: dict[str, set[str | None]] = defaultdict(set)
    for name, fqn in result:
        by_name[name].add(fqn)
    # a name shared by nodes of different layers (or of a layer and none) is left out
    return {name: f for name, fs in by_name.items() if len(fs) == 1 and (f := next(iter(fs))) is not None}


# -- per-layer latency from ONNX Runtime's profiler ----------------------------------------------
@dataclass(frozen=True)
class LayerProfile:
    """Per-layer kernel times of one session from ONNX Runtime's profiler, in seconds.

    layers:      layer fqn -> median over the profiled runs of the summed kernel time of the nodes
                 attributed to it (see `attribute_nodes`); only layers that could be attributed.
    kernels:     layer fqn -> op types of its nodes, in graph order (e.g. ("QuantizeLinear",
                 "QLinearConv"), ("Conv",) for an NCHWc float convolution).
    missing:     quantizable layers of the analysis with no attributed node (left out of layers).
    unattributed: median over runs of the summed kernel time of every other node.
    unattributed_ops: op type -> median over runs of the time of its unattributed nodes.
    total:       median over runs of ORT's "model_run" time (kernels + executor overhead), with
                 profiling on (no overhead visible against unprofiled runs here: noise dominates).
    runs:        profiled runs (after the warm-up runs).
    threads:     intra-op threads of the profiled session.
    """

    layers: dict[str, float]
    kernels: dict[str, tuple[str, ...]]
    missing: tuple[str, ...]
    unattributed: float
    unattributed_ops: dict[str, float]
    total: float
    runs: int
    threads: int | None

    @property
    def layer_sum(self) -> float:
        return sum(self.layers.values())


def _profile_session(optimized: onnx.ModelProto, threads: int | None, prefix: str):
    """A profiling session of an already optimized graph: ORT does not optimize it again, so it
    runs exactly the runner's nodes and kernels (pre-packing happens at session start as usual)."""
    ort = import_ort()
    so = session_options(threads, optimize=False)
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    try:
        return ort.InferenceSession(optimized.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise MpsearchError(f"ONNX Runtime cannot load the optimized graph for profiling: {e}") from e


def _split_runs(events: list[dict]) -> list[tuple[float, list[dict]]]:
    """(model_run duration, its node kernel events) per run, in order."""
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith(_KERNEL_SUFFIX)),
                   key=lambda e: e["ts"])
    out = []
    j = 0
    for r in runs:
        start, end = r["ts"], r["ts"] + r["dur"]
        while j < len(nodes) and nodes[j]["ts"] < start:
            j += 1
        mine = []
        while j < len(nodes) and nodes[j]["ts"] <= end:
            mine.append(nodes[j])
            j += 1
        out.append((float(r["dur"]), mine))
    return out


def interquartile_mean(values: list[float]) -> float:
    """Mean of the middle half of `values` (sorted, a quarter cut from each end; all of them
    when there are fewer than 4)."""
    v = sorted(values)
    k = len(v) // 4
    mid = v[k:len(v) - k] if k else v
    return sum(mid) / len(mid)


def profile_layers(
    runner_or_proto: OrtRunner | onnx.ModelProto,
    batch: Batch,
    analysis: ModelAnalysis,
    *,
    repeats: int = 5,
    threads: int | None = None,
    warmup: int = 2,
) -> LayerProfile:
    """Per-layer kernel times of a session on one batch, from ONNX Runtime's profiler.

    runner_or_proto: an OrtRunner (a `ConfigRunner` from build_session also gives the graph
    before optimization, used to recognise layers by generated initializer names), or an exported
    ModelProto (a runner is made of it). The runner's optimized graph is loaded into a second
    session with profiling on and ORT's optimizer off, so the profile is of exactly the nodes
    and kernels the runner runs; it is run `warmup` times (left out: a fresh session's first runs
    are slow) and then `repeats` times, and the profile JSON (written to a temporary directory,
    removed afterwards) is split per run by ORT's "model_run" events.

    What is counted for a layer (see `attribute_nodes` for the rules): the "<node>_kernel_time"
    durations of its kernel (with whatever ORT fused into it: the activation, a residual Add in
    a FusedConv / NCHWc Conv, the output requantization of a QLinearConv / QGemm), the
    QuantizeLinear / DequantizeLinear on its input when they run as separate nodes (the float to
    uint8 conversion at an FP32 -> int8 boundary, the dequantization before an int8 layer that
    runs as a float convolution), and the run-time DequantizeLinear of its weight and bias in
    that case. Not counted: layout Transposes around int8 kernels (NCHW <-> NHWC), NCHWc
    ReorderInput / ReorderOutput, pooling, Flatten, Adds that were not fused, and the executor's
    overhead between kernels (in `total`, not in any node). The profiler's resolution is 1 us.

    threads: intra-op threads of the profiled session; None: the runner's (a ModelProto: 1).
    Returns durations in seconds: per layer the mean of the middle half of the `repeats` runs (an
    interquartile mean: robust to outlier runs like a median, but averaging the profiler's 1 us
    ticks over many runs resolves kernels of a few microseconds, which a median cannot).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be at least 1 and warmup at least 0, got {repeats} and {warmup}")
    if isinstance(runner_or_proto, OrtRunner):
        runner = runner_or_proto
        source = getattr(runner, "model", None)
    else:
        runner = OrtRunner(runner_or_proto, threads=1 if threads is None else threads)
        source = runner_or_proto
    if threads is None:
        threads = runner.threads
    optimized = runner.optimized_model
    owner = attribute_nodes(optimized, analysis, source)
    op_of = {n.name: n.op_type for n in optimized.graph.node}
    kernels: dict[str, list[str]] = defaultdict(list)
    for n in optimized.graph.node:
        if n.name in owner:
            kernels[owner[n.name]].append(n.op_type)

    feed = runner._feed(batch)
    with tempfile.TemporaryDirectory(prefix="mpsearch-profile-") as d:
        session = _profile_session(optimized, threads, str(Path(d) / "profile"))
        try:
            for _ in range(warmup + repeats):
                session.run(None, feed)
        finally:
            path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
        del session
    runs = _split_runs(events)
    if len(runs) != warmup + repeats:
        raise MpsearchError(f"the ONNX Runtime profile has {len(runs)} model runs, expected {warmup + repeats}")
    runs = runs[warmup:]

    per_run: list[dict[str, float]] = []  # layer -> time, per run
    rest: list[float] = []
    rest_ops: list[dict[str, float]] = []
    for _, nodes in runs:
        sums: dict[str, float] = defaultdict(float)
        ops: dict[str, float] = defaultdict(float)
        for e in nodes:
            name = e["name"][: -len(_KERNEL_SUFFIX)]
            f = owner.get(name)
            if f is not None:
                sums[f] += float(e["dur"])
            else:
                ops[op_of.get(name) or e.get("args", {}).get("op_name", "?")] += float(e["dur"])
        per_run.append(sums)
        rest.append(sum(ops.values()))
        rest_ops.append(ops)

    us = 1e-6

    def central(values: list[dict[str, float]], key: str) -> float:
        return us * interquartile_mean([v.get(key, 0.0) for v in values])

    # a layer none of whose nodes shows up in the profile is not measured (should not happen)
    seen = {f for sums in per_run for f in sums}
    layers = {f: central(per_run, f) for f in analysis.fqns if f in seen}
    all_ops = sorted({op for ops in rest_ops for op in ops})
    return LayerProfile(
        layers=layers,
        kernels={f: tuple(kernels[f]) for f in layers},
        missing=tuple(f for f in analysis.fqns if f not in layers),
        unattributed=us * interquartile_mean(rest),
        unattributed_ops={op: central(rest_ops, op) for op in all_ops},
        total=us * interquartile_mean([total for total, _ in runs]),
        runs=repeats,
        threads=threads,
    )


def layer_latencies(
    runner_or_proto: OrtRunner | onnx.ModelProto,
    batch: Batch,
    analysis: ModelAnalysis,
    *,
    repeats: int = 5,
    threads: int | None = None,
) -> dict[str, float]:
    """Per-layer latency in seconds (layer fqn -> median kernel time): `profile_layers(...).layers`.
    Layers that cannot be attributed are left out; `profile_layers` also gives the time of the
    nodes attributed to no layer (`unattributed`), the run total and what ran for each layer."""
    return profile_layers(runner_or_proto, batch, analysis, repeats=repeats, threads=threads).layers

