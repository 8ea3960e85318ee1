"""What a model's FP32 ONNX export says: each layer's node(s), the tensors' sizes, and the graph the
deployed-graph rule reads (hw_models.graph.DeployGraph) with a hook point for every tensor it may
quantize.

`read_graph` gives the evaluator the tensors to simulate (Evaluator.deploy_graph), `read_layout`
what every deployed graph of the model shares (Evaluator.fp32_layout, which mpsearch.deploy.build
builds on), `deploy_graph_of` the graph for pricing alone. Reads the export; builds nothing (the
deployed graph is mpsearch.deploy.build's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hw_models.graph import DeployGraph, GraphNode, Point
from mpsearch.onnx_export import (
    Graph,
    WeightSite,
    export_fp32,
    find_sites,
    fixed_sizes,
    import_onnx,
    import_ort,
    input_names,
    session_options,
)
from mpsearch.scoring.analysis import pre_hook
from mpsearch.scoring.folding import fold_batchnorm, remap_handles
from mpsearch.tasks.base import Batch, first_samples, run_model

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    from torch import nn

__all__ = ["deploy_graph_of", "find_layer_sites", "graph_nodes", "read_graph", "read_layout"]

_FLOAT = 1  # onnx.TensorProto.FLOAT
_MATCH_RTOL = 1e-3  # a module output matches a graph tensor within this share of the tensor's max
_MATCH_SAMPLES = 2  # example samples compared


# -- reading the FP32 graph ------------------------------------------------------------------
def find_layer_sites(graph: Graph, model: nn.Module, fqns) -> dict[str, list[tuple[WeightSite, np.ndarray]]]:
    """Each layer's Conv / Gemm / MatMul node(s) in the exported graph, with the per-channel factor
    between the node's weight and the module's (1 unless the exporter folded a batch norm)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    claimed: set[int] = set()
    out = {}
    for fqn in fqns:
        w = params.get(f"{fqn}.weight")
        if w is None:
            continue
        found = find_sites(graph, fqn, w.detach().to(torch.float32).numpy(), claimed)
        claimed.update(s.index for s, _ in found)
        if found:
            out[fqn] = found
    return out


def read_layout(proto: onnx.ModelProto, model: nn.Module, fqns) -> dict[str, Any]:
    """What every deployed graph made from this FP32 graph shares: "channels" (tensor -> size of
    dimension 1) and "sites" (layer -> [(node position, factor k)] of its Conv / Gemm / MatMul
    nodes); `build` reads it once per model (Evaluator.fp32_layout)."""
    graph = Graph(proto)
    sites = find_layer_sites(graph, model, fqns)
    return {"channels": _channels(proto),
            "sites": {f: [(s.index, k) for s, k in found] for f, found in sites.items()}}


def _float_values(proto: onnx.ModelProto) -> set[str]:
    """Names of the float tensors computed by the graph (not initializers or constants)."""
    onnx, _ = import_onnx()
    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    floats = {v.name for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.elem_type == _FLOAT}
    constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return floats - constants


def _channels(proto: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> size of dimension 1, where shape inference knows it."""
    return {t: dims[0] for t, dims in _sample_shapes(proto).items() if dims and dims[0] is not None}


def _sample_shapes(proto: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor -> its dimensions after the batch dimension (None where shape inference does not
    know one)."""
    onnx, _ = import_onnx()
    g = onnx.shape_inference.infer_shapes(proto).graph
    return {v.name: [int(d.dim_value) if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim[1:]]
            for v in [*g.value_info, *g.input, *g.output]}


def _elems(proto: onnx.ModelProto) -> dict[str, int]:
    """Tensor -> elements per sample, where every dimension after the batch one is known."""
    out = {}
    for t, dims in _sample_shapes(proto).items():
        if None not in dims:
            n = 1
            for d in dims:
                n *= d
            out[t] = n
    return out


def graph_nodes(proto: onnx.ModelProto, model: nn.Module, fqns) -> list[GraphNode]:
    """The nodes of an FP32 export with a float output, their float data inputs (a layer's data
    input first) and the layer each one is (layers with exactly one node)."""
    graph = Graph(proto)
    sites = find_layer_sites(graph, model, fqns)
    single = {found[0][0].index: fqn for fqn, found in sites.items() if len(found) == 1}
    floats = _float_values(proto)
    nodes = []
    for i, n in enumerate(proto.graph.node):
        if not n.output or n.output[0] not in floats:
            continue
        inputs = [t for t in n.input if t in floats]
        layer = single.get(i)
        if layer is not None:
            data = n.input[sites[layer][0][0].data_index]
            inputs = [data] + [t for t in inputs if t != data]
        nodes.append(GraphNode(n.name, n.op_type, tuple(inputs), n.output[0], layer))
    return nodes


def read_graph(proto: onnx.ModelProto, model: nn.Module, example_input: Batch, handles: Mapping[str, Any],
               fqns) -> DeployGraph:
    """The DeployGraph of an FP32 export of `model`: its nodes, and a hook point for every tensor
    the rule may quantize, found by comparing values on the first example samples (module doc of
    hw_models.graph)."""
    nodes = graph_nodes(proto, model, fqns)
    outputs = [o.name for o in proto.graph.output]
    skeleton = DeployGraph(nodes, outputs, {})
    wanted = skeleton.candidates()
    layer_inputs = {f: skeleton.sites[f].inputs[0] for f in skeleton.sites if handles[f].input_module is not None}
    values = _ort_values(proto, example_input, set(wanted) | set(layer_inputs.values()))
    hooked = _hooked_inputs(model, example_input, handles, layer_inputs, values)
    points: dict[str, Point] = {}
    need_module = []
    for t in wanted:
        layers, other = skeleton.readers(t)
        if layers and not other and all(f in hooked for f in layers):
            points[t] = Point("in", tuple(dict.fromkeys(layers)))
        else:
            need_module.append(t)
    for t, module in _module_outputs(model, example_input, {t: values[t] for t in need_module if t in values}).items():
        points[t] = Point("out", (module,))
    missing = [t for t in wanted if t not in points]
    note = f"{len(missing)} tensors have no hook point: {', '.join(missing[:5])}" if missing else ""
    elems = _elems(proto)
    return DeployGraph(nodes, outputs, points, note, {t: elems[t] for n in nodes for t in (n.output, *n.inputs)
                                                       if t in elems})


def deploy_graph_of(task, analysis, fold: bool = True) -> DeployGraph | None:
    """The deployed graph of a task's model without an Evaluator (batch norms folded as the
    evaluator folds them): for pricing alone (`mpsearch profile`). None when the model cannot be
    exported to ONNX (the cost model then prices conversions along the chain of layers)."""
    try:
        model, _ = fold_batchnorm(task.model) if fold else (task.model, [])
        handles = remap_handles(analysis.handles, task.model, model)
        proto = export_fp32(model, task.example_input, dynamic_dims="batch" if fixed_sizes(task) else "all")
        return read_graph(proto, model, task.example_input, handles, analysis.fqns)
    except Exception:  # noqa: BLE001 - pricing falls back to the chain of layers
        return None


def _ort_values(proto: onnx.ModelProto, example_input: Batch, names: set[str]) -> dict[str, np.ndarray]:
    """The values of graph tensors `names` on the first example samples, by ONNX Runtime."""
    onnx, _ = import_onnx()
    ort = import_ort()

    probe = type(proto)()
    probe.CopyFrom(proto)
    have = {o.name for o in probe.graph.output}
    order = sorted(names - have)
    for name in order:
        probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = session_options(None, optimize=False)
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    args = first_samples(example_input, _MATCH_SAMPLES)
    args = args if isinstance(args, tuple) else (args,)
    feed_names = {i.name for i in session.get_inputs()}
    feed = {n: a.detach().cpu().contiguous().numpy() for n, a in zip(input_names(len(args)), args) if n in feed_names}
    wanted = [n for n in [o.name for o in probe.graph.output] if n in names]
    out = session.run(wanted, feed)
    return dict(zip(wanted, out))


def _close(a: torch.Tensor, ref: np.ndarray) -> bool:
    if a.numel() != ref.size or ref.size == 0:
        return False
    b = torch.from_numpy(np.ascontiguousarray(ref)).reshape(-1).to(torch.float32)
    a = a.detach().reshape(-1).to(torch.float32)
    tol = _MATCH_RTOL * float(b.abs().max()) + 1e-6
    return float((a - b).abs().max()) <= tol


def _run_hooked(model: nn.Module, example_input: Batch, hooks: list) -> None:
    """The model on the first example samples, then its `hooks` removed."""
    try:
        with torch.no_grad():
            run_model(model, first_samples(example_input, _MATCH_SAMPLES))
    finally:
        for hk in hooks:
            hk.remove()


def _hooked_inputs(model: nn.Module, example_input: Batch, handles: Mapping[str, Any],
                   layer_inputs: Mapping[str, str], values: Mapping[str, np.ndarray]) -> set[str]:
    """Layers whose input hook sees exactly the graph's data input of their node."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for f in layer_inputs:
        h = handles[f]

        def grab(x, f=f):
            seen.setdefault(f, x.detach().clone())
            return x

        hooks.append(pre_hook(h.input_module, (h.input_arg,), grab))
    _run_hooked(model, example_input, hooks)
    return {f for f, t in layer_inputs.items() if f in seen and t in values and _close(seen[f], values[t])}


def _module_outputs(model: nn.Module, example_input: Batch, values: Mapping[str, np.ndarray]) -> dict[str, str]:
    """Tensor -> the module whose output it is (values compared; the innermost module, the last
    to return it among siblings; modules called more than once are not used)."""

    if not values:
        return {}
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for t, v in values.items():
        by_shape.setdefault(tuple(v.shape), []).append(t)
    calls: dict[str, int] = {}
    matches: dict[str, list[tuple[int, str]]] = {t: [] for t in values}
    order = [0]
    hooks = []
    for name, m in model.named_modules():
        def after(mod, args, out, name=name):
            calls[name] = calls.get(name, 0) + 1
            order[0] += 1
            if isinstance(out, torch.Tensor):
                for t in by_shape.get(tuple(out.shape), ()):
                    if _close(out, values[t]):
                        matches[t].append((order[0], name))
        hooks.append(m.register_forward_hook(after))
    _run_hooked(model, example_input, hooks)
    out = {}
    for t, found in matches.items():
        names = {n for _, n in found if calls.get(n) == 1}
        inner = [(o, n) for o, n in found if n in names
                 and not any(other != n and (n == "" or other.startswith(n + ".")) for other in names)]
        if inner:
            out[t] = max(inner)[1]
    return out
