"""ONNX export of a model's FP32 graph, the graph-editing pieces the deployed graph is built with,
and an ONNX Runtime runner.

`export_fp32(model, task)` exports the FP32 model (see "Exporter" below); mpsearch.deploy.build
turns that graph into a configuration's deployed QDQ graph with the pieces here: `Graph` reads
it (each layer's Conv / Gemm / MatMul node and the initializer of its weight), `Editor` adds
initializers and QuantizeLinear / DequantizeLinear nodes to it. `OrtRunner` runs a graph in ONNX
Runtime and reports what its optimizer made of it (op counts, int8 kernels).

Integer weights: "int8" stores the integers, zero point 0; "uint8" the integers + 128, zero
point 128 — the same dequantized values, for x86 CPUs without VNNI (AVX2, AVX-512F), whose
u8 x s8 kernels (vpmaddubsw) saturate int16 pair sums and give wrong results (MobileNetV2 W8A8
there: 86 % top-1 agreement with s8 weights, 100 % with u8 weights); `default_weight_dtype`
picks per CPU. A Conv / Gemm bias next to an int8 input becomes int32 (scale input scale x
weight scale, zero point 0, round half to even) + DequantizeLinear, as ONNX Runtime's own
WeightBiasQuantization makes it, so that a layer whose output stays float (the last Gemm) is
fused into an int8 kernel too.

Finding a layer's node. The TorchScript exporter keeps parameter names as initializer names
("features.0.weight"), except where it folds a BatchNorm into the preceding convolution
(eval mode): the folded weight gets a generated name ("onnx::Conv_538") and equals the module's
weight times one factor k_c per output channel (gamma_c / sqrt(var_c + eps)). A layer is found,
in this order, by (1) the initializer named `<fqn>.weight`, (2) the node's scope name
("/features/features.3/conv/conv.0/conv.0.0/Conv" is module features.3.conv.0.0), (3) the one
node whose weight matches; in every case the initializer's values must equal the module's
weight up to a per-output-channel factor k_c. The int8 values and scales of a folded weight are
those of the module's weight with the factor moved into the scale: q_c * sign(k_c) and
s_c * |k_c| — the same numbers the simulated model computes before its BatchNorm. (The
evaluator exports its own model, batch norms already folded, so k_c is 1 there.)

Exporter: the TorchScript-based one by default (`exporter="torchscript"`), deprecated since
torch 2.9 but present in 2.14: it keeps parameter names and module scopes on the graph and is
fast (digits 0.5 s, MobileNetV2 ~1 s here). `exporter="dynamo"` (torch.export + onnxscript)
gives the same graph semantics but takes ~8x longer (digits 3.6 s, MobileNetV2 15 s on this
2-core machine); it is the way forward once the TorchScript path is removed.
"""

from __future__ import annotations

import io
import platform
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mpsearch.errors import MissingDependencyError, MpsearchError
from mpsearch.tasks.base import Batch

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = [
    "DEFAULT_OPSET",
    "INT8_KERNEL_OPS",
    "Editor",
    "Graph",
    "OrtRunner",
    "WeightSite",
    "count_int8_kernels",
    "count_ops",
    "default_weight_dtype",
    "export_fp32",
    "find_sites",
    "fixed_sizes",
    "import_onnx",
    "import_ort",
    "input_names",
    "scope_fqn",
    "set_nodes",
]

DEFAULT_OPSET = 17
MIN_OPSET = 13  # per-axis DequantizeLinear

# Ops of an optimized ONNX Runtime graph that run a layer's matrix multiply in int8.
INT8_KERNEL_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "MatMulInteger",
    "ConvInteger",
    "QGemm",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QAttention",
)

_RESHAPES = ("Flatten", "Reshape", "Squeeze", "Unsqueeze")
_INSTALL = "pip install onnx onnxruntime onnxscript (dependencies of mpsearch)"
_FOLD_RTOL = 1e-4  # a folded weight must equal k_c * weight_c to this relative tolerance


def import_onnx():
    """(onnx, onnx.numpy_helper); MissingDependencyError, saying what to install, without onnx."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as e:
        raise MissingDependencyError(f"ONNX export needs the onnx package: {_INSTALL} ({e})") from None
    return onnx, numpy_helper


def import_ort():
    """The onnxruntime module; MissingDependencyError, saying what to install, without it."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError(f"running ONNX models needs onnxruntime: {_INSTALL} ({e})") from None
    return ort


# -- export ----------------------------------------------------------------------------------
def _as_tuple(x: Batch) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


EXPORTERS = ("torchscript", "dynamo")


def input_names(n: int) -> list[str]:
    """The names `export_fp32` gives a model's `n` inputs: "input", or "input_0", "input_1", ..."""
    return ["input"] if n == 1 else [f"input_{i}" for i in range(n)]


DYNAMIC_DIMS = ("batch", "all")


def _export_fp32(
    model: nn.Module, example_input: Batch, opset: int, exporter: str, dynamic_dims: str
) -> onnx.ModelProto:
    onnx, _ = import_onnx()
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r} (known: {', '.join(EXPORTERS)})")
    if dynamic_dims not in DYNAMIC_DIMS:
        raise ValueError(f"unknown dynamic_dims {dynamic_dims!r} (known: {', '.join(DYNAMIC_DIMS)})")
    args = _as_tuple(example_input)
    names = input_names(len(args))
    ndims = {name: (a.dim() if dynamic_dims == "all" else min(a.dim(), 1)) for name, a in zip(names, args)}
    dynamic = {name: {d: "batch" if d == 0 else f"{name}_dim{d}" for d in range(n)} for name, n in ndims.items()}
    dynamic["output"] = {0: "batch"}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated (kept, see above)
            if exporter == "torchscript":
                buf = io.BytesIO()
                torch.onnx.export(
                    model,
                    args,
                    buf,
                    dynamo=False,
                    opset_version=opset,
                    input_names=names,
                    output_names=["output"],
                    dynamic_axes=dynamic,
                    do_constant_folding=True,
                )
                return onnx.load_from_string(buf.getvalue())
            dims = {"batch": torch.export.Dim("batch")}
            shapes = tuple(
                {d: dims.setdefault(n, torch.export.Dim(n)) for d, n in dynamic[name].items()} for name in names
            )
            program = torch.onnx.export(
                model,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=shapes,
                verbose=False,
            )
            return program.model_proto
    except Exception as e:
        raise MpsearchError(f"ONNX export of the model failed ({exporter}): {type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)


def fixed_sizes(task) -> bool:
    """Whether every input of a task has the same sizes beyond the batch dimension in all batches."""
    batches = [task.example_input, *(inputs for inputs, _ in task.eval_batches)]
    shapes = {tuple(tuple(a.shape[1:]) for a in (b if isinstance(b, tuple) else (b,))) for b in batches}
    return len(shapes) == 1


def export_fp32(model: nn.Module, example_input: Batch, *, dynamic_dims: str = "batch",
                exporter: str = "torchscript", opset: int | None = None) -> onnx.ModelProto:
    """The model as an FP32 ONNX graph (eval mode; the model is not modified). dynamic_dims
    "batch": dimension 0 of every input and of the output is dynamic (the other sizes are the
    example input's); "all": every input dimension is (token sequences of varying length; see
    `fixed_sizes`). opset: DEFAULT_OPSET (17) for TorchScript, 18 for dynamo when None. Raises
    MissingDependencyError without onnx, MpsearchError when torch cannot export the model."""
    if opset is None:
        opset = DEFAULT_OPSET if exporter == "torchscript" else max(DEFAULT_OPSET, 18)
    return _export_fp32(model, example_input, opset, exporter, dynamic_dims)


def scope_fqn(node_name: str) -> str | None:
    """The module fqn of a TorchScript-exported node name, e.g.
    "/features/features.3/conv/conv.0/conv.0.0/Conv" -> "features.3.conv.0.0"."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    path: list[str] = []
    prev = ""
    for comp in parts[:-1]:
        path.append(comp[len(prev) + 1 :] if prev and comp.startswith(prev + ".") else comp)
        prev = comp
    return ".".join(path)


@dataclass
class WeightSite:
    """A Conv / Gemm / MatMul node of an exported graph that consumes a weight initializer."""

    index: int  # position of the node in the graph
    node: Any  # onnx.NodeProto
    data_index: int  # input position of the activation
    weight_index: int  # input position of the weight
    init_name: str  # the initializer it resolves to
    transposed: bool  # the node consumes the initializer transposed (a Transpose node between)
    out_axis: int  # output-channel axis of the weight as the node consumes it
    to_module: tuple[int, ...] | None  # permutation: node layout -> module layout (None: same)


class Graph:
    """An exported ONNX graph, read for editing: its nodes, initializers, the producer and the
    consumer count of every value, and `sites`, every node that consumes a weight (WeightSite)."""

    def __init__(self, model: onnx.ModelProto):
        _, self.nh = import_onnx()
        self.model = model
        g = model.graph
        self.nodes = list(g.node)
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output}
        self.n_consumers = Counter(i for n in self.nodes for i in n.input)
        self.n_consumers.update(o.name for o in g.output)
        self.names = {n.name for n in self.nodes} | set(self.inits) | set(self.producer)
        self.sites = self._sites()

    def _producer(self, name: str) -> Any | None:
        i = self.producer.get(name)
        return None if i is None else self.nodes[i]

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def resolve(self, name: str) -> tuple[str, bool] | None:
        """The initializer a value comes from through Identity / 2-D Transpose nodes, and
        whether it is transposed on the way."""
        transposed = False
        for _ in range(16):
            if name in self.inits:
                return name, transposed
            n = self._producer(name)
            if n is None:
                return None
            if n.op_type == "Identity":
                name = n.input[0]
            elif n.op_type == "Transpose":
                perm = [list(a.ints) for a in n.attribute if a.name == "perm"]
                if perm and perm[0] != [1, 0]:
                    return None
                transposed, name = not transposed, n.input[0]
            else:
                return None
        return None

    def _sites(self) -> list[WeightSite]:
        sites = []
        for index, n in enumerate(self.nodes):
            if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
                continue
            r = self.resolve(n.input[1])
            if r is None:
                continue
            init_name, transposed = r
            if n.op_type == "Conv":
                axis, perm = 0, None
            else:
                attrs = {a.name: a.i for a in n.attribute}
                if n.op_type == "Gemm" and attrs.get("transA", 0):
                    continue
                trans_b = n.op_type == "Gemm" and bool(attrs.get("transB", 0))
                if len(self.inits[init_name].dims) != 2:
                    continue
                axis, perm = (0, None) if trans_b else (1, (1, 0))
            sites.append(WeightSite(index, n, 0, 1, init_name, transposed, axis, perm))
        return sites

    def reshape_chain_top(self, name: str) -> int | None:
        """The position of the first of a chain of reshape-like nodes (Flatten, Reshape, ...)
        producing `name`, each used by the next only; None when `name` does not come from one."""
        top = None
        i = self.producer.get(name)
        while i is not None and self.nodes[i].op_type in _RESHAPES and self.n_consumers[self.nodes[i].output[0]] == 1:
            top = i
            i = self.producer.get(self.nodes[i].input[0])
        return top

    def consumed(self, site: WeightSite) -> np.ndarray:
        """The weight as the node consumes it."""
        w = self.nh.to_array(self.inits[site.init_name])
        return w.T if site.transposed else w

    def module_layout(self, site: WeightSite) -> np.ndarray:
        w = self.consumed(site)
        return w if site.to_module is None else w.transpose(site.to_module)


def _channel_factors(folded: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """k with folded[c] == k[c] * w[c] for every output channel c (to _FOLD_RTOL), else None."""
    if folded.shape != w.shape:
        return None
    f = folded.reshape(folded.shape[0], -1).astype(np.float64)
    x = w.reshape(w.shape[0], -1).astype(np.float64)
    xx = (x * x).sum(1)
    k = np.where(xx > 0, (f * x).sum(1) / np.where(xx > 0, xx, 1.0), 1.0)
    err = np.abs(f - k[:, None] * x).max(1) if f.shape[1] else np.zeros(len(k))
    tol = _FOLD_RTOL * np.maximum(np.abs(f).max(1) if f.shape[1] else 0.0, 1e-30)
    if not bool((err <= tol).all()) or not bool(np.all(k != 0)):
        return None
    return k


def find_sites(graph: Graph, fqn: str, w: np.ndarray, claimed: set[int]) -> list[tuple[WeightSite, np.ndarray]]:
    """The node(s) of layer `fqn` (module weight `w`) among the sites not `claimed`, each with its
    per-output-channel factor k (module doc, "Finding a layer's node"). Raises ValueError when the
    initializer named after the layer does not match `w`, or the weight matches several nodes."""
    def matches(sites):
        out = []
        for s in sites:
            k = _channel_factors(graph.module_layout(s), w)
            if k is not None:
                out.append((s, k))
        return out

    free = [s for s in graph.sites if s.index not in claimed]
    by_name = [s for s in free if s.init_name == f"{fqn}.weight"]
    if by_name:
        found = matches(by_name)
        if len(found) != len(by_name):
            raise ValueError(f"layer {fqn!r}: initializer {fqn}.weight does not match the module's weight")
        return found
    by_scope = matches([s for s in free if scope_fqn(s.node.name) == fqn])
    if by_scope:
        return by_scope
    by_value = matches(free)
    if len(by_value) > 1:
        raise ValueError(f"layer {fqn!r}: its weight matches {len(by_value)} nodes of the exported graph "
                         f"({', '.join(s.node.name for s, _ in by_value)}); cannot tell which is the layer")
    return by_value


class Editor:
    """Collects the nodes and initializers an edit adds to a graph (mpsearch.deploy.build)."""

    def __init__(self, graph: Graph):
        self.onnx, self.nh = import_onnx()
        self.graph = graph
        self.inits: list = []
        self.before: dict[int, list] = {}  # node position -> new nodes to insert before it
        self.after: dict[int, list] = {}  # node position -> new nodes to insert after it

    def insert(self, position: int, nodes: list) -> None:
        self.before.setdefault(position, []).extend(nodes)

    def insert_after(self, position: int, nodes: list) -> None:
        self.after.setdefault(position, []).extend(nodes)

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.graph.unique(base)
        self.inits.append(self.nh.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> tuple[Any, str]:
        out = self.graph.unique(base)
        name = self.graph.unique(f"/{base}/{op}")
        return self.onnx.helper.make_node(op, inputs, [out], name=name, **attrs), out

    def input_qdq(self, position: int, index: int, base: str, scale: str, zero: str) -> None:
        """QuantizeLinear -> DequantizeLinear on input `index` of the node at `position`."""
        consumer = self.graph.nodes[position]
        qn, xq = self.node("QuantizeLinear", [consumer.input[index], scale, zero], f"{base}_quantized")
        dqn, xdq = self.node("DequantizeLinear", [xq, scale, zero], f"{base}_dequantized")
        consumer.input[index] = xdq
        self.insert(position, [qn, dqn])

    def bias(self, site: WeightSite, fqn: str, act_scale: float, w_scale: np.ndarray) -> None:
        """An int32 bias (scale act_scale * w_scale, zero point 0) + DequantizeLinear, as ORT makes it
        for a Conv / Gemm followed by a QuantizeLinear; done here so that a layer whose output stays
        float (the last one) is fused too. Nothing for a bias that is not a float initializer."""
        node = site.node
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            return
        r = self.graph.resolve(node.input[2])
        if r is None or r[1]:
            return
        b = self.nh.to_array(self.graph.inits[r[0]])
        if b.dtype != np.float32 or b.shape != w_scale.shape:
            return
        b_scale = (np.float32(act_scale) * w_scale).astype(np.float32)  # in float32, as ORT does
        b_int = np.clip(np.round(b / b_scale), -(2**31), 2**31 - 1).astype(np.int32)
        bi = self.init(f"{fqn}.bias_quantized", b_int)
        bs = self.init(f"{fqn}.bias_scale", b_scale)
        dq, out = self.node("DequantizeLinear", [bi, bs], f"{fqn}.bias_dequantized", axis=0)
        node.input[2] = out
        self.insert(site.index, [dq])

    def apply(self) -> None:
        g = self.graph.model.graph
        ordered = []
        for i, n in enumerate(self.graph.nodes):
            ordered.extend(self.before.get(i, ()))
            ordered.append(n)
            ordered.extend(self.after.get(i, ()))
        set_nodes(g, ordered)
        g.initializer.extend(self.inits)
        _prune(g)


def set_nodes(g, nodes: list) -> None:
    """Replace the graph's nodes by `nodes` (copied first: some may be the graph's own)."""
    copies = []
    for n in nodes:
        c = type(n)()
        c.CopyFrom(n)
        copies.append(c)
    del g.node[:]
    g.node.extend(copies)


def _prune(g) -> None:
    """Drop Identity / Transpose / Constant nodes and initializers nothing uses any more."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        keep = [n for n in g.node if n.op_type not in ("Identity", "Transpose", "Constant")
                or any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        set_nodes(g, keep)
    used = {i for n in g.node for i in n.input} | outputs
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)


# -- ONNX Runtime --------------------------------------------------------------------------
def count_ops(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes per op type in a (typically ORT-optimized) model, sorted by name."""
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def count_int8_kernels(model: onnx.ModelProto) -> int:
    """How many nodes of the model run a matrix multiply / convolution in int8 (INT8_KERNEL_OPS)."""
    return sum(1 for n in model.graph.node if n.op_type in INT8_KERNEL_OPS)


def session_options(threads: int | None, optimize: bool = True):
    """ONNX Runtime CPU session options: sequential, one inter-op thread, `threads` intra-op
    threads (None: ORT's default), graph optimization ORT_ENABLE_ALL or ORT_DISABLE_ALL.

    The intra-op workers stop spinning when a run returns (session.force_spinning_stop): with
    several sessions in one process, as when configurations are timed interleaved, each idle
    session's workers otherwise spin on and take the cores from the session being timed (here,
    mobilenet_v2 at 2 threads: 15-21 ms instead of 7, and identical sessions 10-50% apart)."""
    ort = import_ort()
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3  # the "optimized model has hardware-specific ops" warning
    return so


class OrtRunner:
    """An ONNX Runtime CPU session of a model, with what its optimizer made of the graph.

    threads: intra-op threads (None: ONNX Runtime's default); inter-op is 1, sequential.
    optimize: graph optimization ORT_ENABLE_ALL (True) or ORT_DISABLE_ALL (False).

    After construction `optimized_model` is the graph ORT runs (saved through
    SessionOptions.optimized_model_filepath), `op_counts` its op types and `int8_kernels` the
    number of int8 matrix-multiply / convolution nodes in it.
    """

    def __init__(self, model: onnx.ModelProto, threads: int | None = 1, optimize: bool = True):
        onnx, _ = import_onnx()
        ort = import_ort()
        so = session_options(threads, optimize)
        self.threads = threads
        with tempfile.TemporaryDirectory(prefix="mpsearch-ort-") as d:
            so.optimized_model_filepath = str(Path(d) / "optimized.onnx")
            self.session = ort.InferenceSession(
                model.SerializeToString(), so, providers=["CPUExecutionProvider"]
            )
            self.optimized_model = onnx.load(so.optimized_model_filepath)
        self.op_counts = count_ops(self.optimized_model)
        self.int8_kernels = count_int8_kernels(self.optimized_model)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._output = self.session.get_outputs()[0].name

    def _feed(self, inputs: Batch) -> dict[str, np.ndarray]:
        args = _as_tuple(inputs)
        names = input_names(len(args))
        return {n: a.detach().cpu().contiguous().numpy() for n, a in zip(names, args) if n in self.input_names}

    def run(self, inputs: Batch) -> torch.Tensor:
        """The model's output on one batch (a tensor or a tuple of tensors, as the model takes)."""
        out = self.session.run([self._output], self._feed(inputs))[0]
        return torch.from_numpy(np.ascontiguousarray(out))

    def time_batch(self, inputs: Batch, repeats: int = 5, warmup: bool = True) -> list[float]:
        """Seconds per run of one batch, `repeats` runs (after one untimed run if warmup)."""
        feed = self._feed(inputs)
        if warmup:
            self.session.run([self._output], feed)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.session.run([self._output], feed)
            times.append(time.perf_counter() - t0)
        return times


WEIGHT_DTYPES = ("int8", "uint8")


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has VNNI (avx512_vnni, avx_vnni or amx_int8); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    return None


def default_weight_dtype() -> str:
    """"int8" unless this is an x86 CPU without VNNI (or one that cannot be told), then "uint8"."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "int8"
    return "int8" if cpu_has_vnni() else "uint8"
