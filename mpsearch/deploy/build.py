"""The deployed ONNX graph of a configuration: what `export --format onnx` writes, `calibrate` times
and `verify` measures.

`build(evaluator, candidate)` takes the FP32 graph of the evaluator's model (batch norms folded,
as the evaluator quantizes it; exported once, `Evaluator.fp32_onnx`) and makes the graph the
quantization rule of `hw_models.graph` describes, with the evaluator's own numbers:

- every tensor of `Plan.tensors` gets QuantizeLinear -> DequantizeLinear (uint8, per tensor)
  where it is produced, with the parameters of its hook point, so ONNX Runtime fuses int8
  regions into QLinearConv / QLinearAdd / QLinearGlobalAveragePool / QGemm and a precision
  boundary costs one QuantizeLinear or DequantizeLinear;
- every layer of `Plan.edges` gets the pair on its own input (before the reshapes feeding it);
- an integer weight becomes its integers (the evaluator's, scales per output channel) behind a
  per-channel DequantizeLinear, its bias an int32 tensor (scale input x weight scale) as ONNX
  Runtime's own quantizer makes it. Weights of 4 bits and fewer are stored as INT4 (opset 21)
  and widened by a Cast to INT8 that ONNX Runtime folds when it loads the model: the file holds
  4 bits a weight and the convolutions run on int8 kernels. (A DequantizeLinear reading INT4
  directly makes ONNX Runtime dequantize the weight on every run and run a float convolution:
  3x slower on mobilenet_v2 here.) int6 is stored in 8 bits. On x86 CPUs without VNNI the
  weights are stored as uint8 (+128, zero point 128; see mpsearch.onnx_export) and 8 bits wide.
- fp16 / bf16 / fp8 weights are stored as float32 tensors holding the rounded values; bias
  corrections are added into the biases.
- a float layer reading a dequantized int8 tensor gets a DequantizeLinear of its own whose scale
  is given per channel (all channels equal: the same numbers). ONNX Runtime's
  WeightBiasQuantization transform quantizes the float weight of a Conv / Gemm that sits between
  a per-tensor DequantizeLinear and a QuantizeLinear, i.e. an fp32 layer between int8 neighbours,
  and runs it in int8 behind the configuration's back; it leaves a per-channel input alone.

Why not onnxruntime.quantization.quantize_static with nodes_to_exclude and TensorQuantOverrides?
It makes the same all-int8 graph (checked side by side in benchmarks/deploy.py), but (1) it runs
its own calibration per configuration (5 s for mobilenet_v2 here) while the evaluator already
holds every parameter; (2) its integers are round(w / scale) of the float weight, not the
evaluator's (sub-8-bit grids, MSE clipping, AdaRound); (3) a node it excludes between quantized
neighbours reads a per-tensor DequantizeLinear and feeds a QuantizeLinear, so ONNX Runtime's
WeightBiasQuantization quantizes it anyway (seen here: the excluded digits layer features.4 runs
as QLinearConv); and (4) the evaluator must know before calibrating which tensors are quantized,
which is the rule in hw_models.graph, not quantize_static's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hw_models import Candidate, LayerChoice, Precision
from hw_models.graph import Plan
from mpsearch.errors import EvaluationError, InvalidConfigError, MpsearchError
from mpsearch.onnx_export import (
    Editor,
    Graph,
    WeightSite,
    default_weight_dtype,
    import_onnx,
    set_nodes,
)
from mpsearch.scoring.onnx_graph import find_layer_sites, graph_nodes, read_graph
from mpsearch.scoring.quant import resolve_clipping, weight_qparams, weight_range

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from mpsearch.scoring.evaluator import Evaluator

# find_layer_sites, graph_nodes and read_graph read the FP32 graph: they live in mpsearch.scoring.onnx_graph
# (which the evaluator imports); importing them from here still works.
__all__ = ["INT4_OPSET", "Deployment", "build", "find_layer_sites", "graph_nodes", "read_graph", "weight_ints"]

INT4_OPSET = 21
INT4_MAX_BITS = 4  # integer weights of this many bits and fewer are stored as INT4


# -- building a deployed graph ---------------------------------------------------------------
@dataclass
class Deployment:
    """A configuration's deployed graph.

    proto:   the ONNX model (QDQ; metadata "mpsearch.config" when made by export, and
             "mpsearch.runtime": what runs, per layer, where it is not what was asked).
    plan:    the quantized tensors (hw_models.graph.Plan).
    storage: layer -> how its weight is stored ("int4", "int8", "uint8", "float32", ...).
    notes:   layer -> what runs instead of what the configuration asks, and why.
    weight_dtype: "int8" or "uint8" (see mpsearch.onnx_export.default_weight_dtype).
    """

    proto: Any
    plan: Plan
    candidate: Candidate
    storage: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    weight_dtype: str = "int8"

    def runtime_note(self) -> str:
        return json.dumps({"storage": self.storage, "notes": self.notes, "weight_dtype": self.weight_dtype})


def weight_ints(evaluator: Evaluator, fqn: str, precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers (torch.int8, module layout) and per-output-channel scales [out] of the
    evaluator's quantized weight of a layer: the scales of its quantizer (`weight_qparams` with the
    evaluator's settings), the integers round(simulated / scale), checked to give the simulated
    weight back exactly. Raises InvalidConfigError for what per-channel QDQ cannot hold."""
    s = evaluator.settings
    fp32 = evaluator.weight(fqn, Precision.FP32).to(torch.float32)
    where = f"layer {fqn!r} ({precision})"
    if not precision.is_int or not 2 <= precision.bits <= 8:
        raise InvalidConfigError(f"{where}: only int2..int8 weights are stored as integers")
    if s.group_size is not None and fp32.dim() == 2:
        raise InvalidConfigError(f"{where}: group-wise weight scales (group_size {s.group_size}) "
                                 "cannot be exported as per-channel QDQ")
    scale = weight_qparams(fp32, precision.bits, granularity=s.weight_granularity,
                           clipping=resolve_clipping(s.weight_clipping, precision.bits))
    simulated = evaluator.weight(fqn, precision).to(torch.float32).contiguous()
    ints = torch.round(simulated / scale)
    qmin, qmax = weight_range(precision.bits)
    if not torch.equal(ints * scale, simulated) or float(ints.min()) < qmin or float(ints.max()) > qmax:
        raise EvaluationError(f"{where}: the evaluator's weight is not on the {precision} grid of its scales; "
                              "mpsearch.deploy.build must follow the evaluator's weight quantizer")
    per_channel = scale.reshape(-1).expand(fp32.shape[0]) if scale.numel() == 1 else scale.reshape(-1)
    return ints.to(torch.int8), per_channel.to(torch.float32).contiguous()


class _Builder(Editor):
    """The edits that turn the FP32 graph into a deployed one (module doc)."""

    def __init__(self, graph: Graph):
        super().__init__(graph)
        self.float_inputs: list[tuple[int, int]] = []  # (node position, data input) of float layers

    def int_weight(self, site: WeightSite, fqn: str, ints: torch.Tensor, scale: torch.Tensor, k: np.ndarray,
                   weight_dtype: str) -> np.ndarray:
        """Feed the site's node integer weights through a per-channel DequantizeLinear; returns the
        scales (per output channel, the folding factor k included)."""
        q = ints.numpy().astype(np.int8)
        sign = np.sign(k).astype(np.int8).reshape((-1,) + (1,) * (q.ndim - 1))
        q = q * sign  # a negative folding factor flips the channel's integers
        s = (scale.to(torch.float64).numpy() * np.abs(k)).astype(np.float32)
        if site.to_module is not None:
            q = q.transpose(site.to_module)  # module layout -> node layout (2-D: a transpose)
        if weight_dtype == "uint8":  # the same values on the unsigned grid, zero point 128
            q = (q.astype(np.int16) + 128).astype(np.uint8)
            zero = np.full(len(s), 128, np.uint8)
        else:
            zero = np.zeros(len(s), np.int8)
        base = f"{fqn}.weight"
        w = self.init(f"{base}_quantized", np.ascontiguousarray(q))
        sc = self.init(f"{base}_scale", s)
        z = self.init(f"{base}_zero_point", zero)
        dq, out = self.node("DequantizeLinear", [w, sc, z], f"{base}_dequantized", axis=site.out_axis)
        site.node.input[site.weight_index] = out
        self.insert(site.index, [dq])
        return s

    def guard_float_inputs(self, channels: Mapping[str, int]) -> None:
        """channel_dq for every float layer reading a per-tensor DequantizeLinear (module doc)."""
        dqs = {o: n for group in [*self.before.values(), *self.after.values()] for n in group
               if n.op_type == "DequantizeLinear" for o in n.output}
        for position, data_index in self.float_inputs:
            node = self.graph.nodes[position]
            name = node.input[data_index]
            dq = dqs.get(name)
            if dq is None:
                i = self.graph.producer.get(name)
                dq = self.graph.nodes[i] if i is not None else None
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            n_channels = channels.get(name) or channels.get(dq.input[0])
            if n_channels:
                self.channel_dq(position, data_index, dq, n_channels)

    def act(self, base: str, scale: float, zero: int) -> tuple[str, str]:
        s = self.init(f"{base}_scale", np.float32(scale))
        z = self.init(f"{base}_zero_point", np.uint8(zero))
        return s, z

    def quantize_tensor(self, tensor: str, scale: float, zero: int) -> None:
        """Q -> DQ where `tensor` is produced: its producer writes "<tensor>_float", the DQ writes
        `tensor`, so every consumer (and a graph output) reads the int8 values."""
        position = self.graph.producer[tensor]
        producer = self.graph.nodes[position]
        raw = self.graph.unique(f"{tensor}_float")
        producer.output[list(producer.output).index(tensor)] = raw
        base = tensor.strip("/").replace("/", ".")
        s, z = self.act(base, scale, zero)
        q, xq = self.node("QuantizeLinear", [raw, s, z], f"{base}_quantized")
        dq = self.onnx.helper.make_node("DequantizeLinear", [xq, s, z], [tensor],
                                        name=self.graph.unique(f"/{base}_dequantized/DequantizeLinear"))
        self.insert_after(position, [q, dq])

    def channel_dq(self, position: int, data_index: int, dq: Any, channels: int) -> None:
        """Give the float node at `position` a DequantizeLinear of its own, reading what `dq` reads,
        with the scale and zero point repeated per channel (axis 1): the same numbers, but not a
        per-tensor DequantizeLinear, which ONNX Runtime's WeightBiasQuantization would take as
        the input of an int8 layer."""
        inits = {**self.graph.inits, **{t.name: t for t in self.inits}}
        if len(dq.input) < 3 or dq.input[1] not in inits or dq.input[2] not in inits:
            return
        scale = self.nh.to_array(inits[dq.input[1]])
        zero = self.nh.to_array(inits[dq.input[2]])
        if scale.size != 1:
            return
        node = self.graph.nodes[position]
        base = f"{node.name.strip('/').replace('/', '.')}.input_channels"
        s = self.init(f"{base}_scale", np.full(channels, scale.reshape(-1)[0], np.float32))
        z = self.init(f"{base}_zero_point", np.full(channels, zero.reshape(-1)[0], zero.dtype))
        new, out = self.node("DequantizeLinear", [dq.input[0], s, z], f"{base}_dequantized", axis=1)
        node.input[data_index] = out
        self.insert(position, [new])



def build(
    evaluator: Evaluator,
    candidate: Candidate,
    *,
    weight_dtype: str = "auto",
    int4_storage: bool = True,
) -> Deployment:
    """The deployed ONNX graph of `candidate` (module doc), with the evaluator's numbers.

    weight_dtype: "auto" (mpsearch.onnx_export.default_weight_dtype: int8 on CPUs with VNNI,
    uint8 without), "int8" or "uint8". int4_storage: store weights of 4 bits and fewer as INT4
    (widened to int8 when ONNX Runtime loads the model); False keeps them in 8 bits.

    Raises InvalidConfigError for what ONNX QDQ cannot express (an activation other than int8 or
    fp32, int16 or group-wise weights), MpsearchError when the model has no deploy graph.
    """
    onnx, _ = import_onnx()
    if weight_dtype == "auto":
        weight_dtype = default_weight_dtype()
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"unknown weight_dtype {weight_dtype!r} (known: auto, int8, uint8)")
    dg = evaluator.deploy_graph
    if dg is None:
        raise MpsearchError(f"the model has no deployable ONNX graph: {evaluator.deploy_note}")
    plan = evaluator.plan(candidate)
    for fqn, p in plan.edges.items():
        if p != Precision.INT8:
            c = candidate[fqn]
            raise InvalidConfigError(f"layer {fqn!r} ({c.weight}/{c.activation}): cannot deploy an {p} activation "
                                     "to ONNX (int8 and fp32 only)")
    proto = type(evaluator.fp32_onnx)()
    proto.CopyFrom(evaluator.fp32_onnx)
    layout = evaluator.fp32_layout
    channels = layout["channels"]
    graph = Graph(proto)
    by_index = {s.index: s for s in graph.sites}
    sites = {f: [(by_index[i], k) for i, k in found] for f, found in layout["sites"].items()}
    b = _Builder(graph)
    storage: dict[str, str] = {}
    notes = dict(plan.notes)

    # quantized tensors, where they are produced
    for t, point in plan.tensors.items():
        p = evaluator.point_params(point)
        b.quantize_tensor(t, float(p.scale), int(p.zero_point))

    for fqn, choice in candidate.items():
        found = sites.get(fqn)
        if not found:
            if choice != LayerChoice(Precision.FP32, Precision.FP32):
                raise InvalidConfigError(f"layer {fqn!r}: no Conv / Gemm / MatMul node of the exported graph uses "
                                         "its weight")
            continue
        delta = evaluator.bias_delta(fqn, choice.weight)
        edge = plan.edges.get(fqn)
        int8 = fqn in plan.int8_layers
        for site, k in found:
            if delta is not None:
                _add_bias(b, site, fqn, -delta.reshape(-1).to(torch.float64).numpy(), k)
            if edge is not None:
                p = evaluator.act_params(fqn, Precision.INT8)
                _edge_qdq(b, site, fqn, float(p.scale), int(p.zero_point))
            if choice.weight.is_int:
                ints, scale = weight_ints(evaluator, fqn, choice.weight)
                w_scale = b.int_weight(site, fqn, ints, scale, k, weight_dtype)
                narrow = int4_storage and weight_dtype == "int8" and choice.weight.bits <= INT4_MAX_BITS
                storage[fqn] = "int4" if narrow else weight_dtype
                if int8:
                    if edge is not None:
                        in_scale = float(evaluator.act_params(fqn, Precision.INT8).scale)
                    else:
                        data = site.node.input[site.data_index]
                        src = dg.source(data)
                        p = evaluator.point_params(plan.tensors[src])
                        in_scale = float(p.scale)
                        if data != src:
                            # read through reshapes: the same pair again at the layer (a no-op on values
                            # on the grid), so that ONNX Runtime sees DequantizeLinear -> layer and fuses it
                            s_, z_ = b.act(f"{fqn}.input", float(p.scale), int(p.zero_point))
                            b.input_qdq(site.index, site.data_index, f"{fqn}.input", s_, z_)
                    b.bias(site, fqn, in_scale, w_scale)
                else:
                    notes.setdefault(fqn, f"{choice.weight} weights with {choice.activation} activations: "
                                          "dequantized on every run and run as a float layer")
            elif choice.weight != Precision.FP32:
                _set_float_weight(b, site, evaluator.weight(fqn, choice.weight), k)
                storage[fqn] = f"float32 ({choice.weight} values)"
            if not int8:
                b.float_inputs.append((site.index, site.data_index))
    b.guard_float_inputs(channels)
    b.apply()
    onnx.checker.check_model(proto)
    narrow = {f for f, s in storage.items() if s == "int4"}
    if narrow:
        proto, done = _store_int4(proto, narrow)
        if not done:
            storage.update(dict.fromkeys(narrow, "int8"))
            notes["*"] = f"opset {INT4_OPSET} conversion failed: weights of 4 bits and fewer are stored in 8 bits"
    dep = Deployment(proto, plan, candidate, storage, notes, weight_dtype)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mpsearch.runtime", dep.runtime_note()
    return dep


def _edge_qdq(b: _Builder, site: WeightSite, fqn: str, scale: float, zero: int) -> None:
    """Q -> DQ on a layer's own input (and before the reshapes feeding it, with the same
    parameters: a no-op on values already on the grid, so that the producer fuses with it)."""
    s, z = b.act(f"{fqn}.input", scale, zero)
    top = b.graph.reshape_chain_top(site.node.input[site.data_index])
    b.input_qdq(site.index, site.data_index, f"{fqn}.input", s, z)
    if top is not None:
        b.input_qdq(top, 0, f"{fqn}.input_source", s, z)


def _add_bias(b: _Builder, site: WeightSite, fqn: str, value: np.ndarray, k: np.ndarray) -> None:
    """bias += value (in the module's units, times the folding factor k of the node's weight)."""
    node = site.node
    v = (value * k).astype(np.float32)
    if node.op_type not in ("Conv", "Gemm"):
        raise InvalidConfigError(f"layer {fqn!r}: a bias correction needs a Conv or Gemm node, found {node.op_type}")
    if len(node.input) >= 3 and node.input[2]:
        r = b.graph.resolve(node.input[2])
        if r is None or r[1]:
            raise InvalidConfigError(f"layer {fqn!r}: its bias is not an initializer; cannot add the bias correction")
        old = b.nh.to_array(b.graph.inits[r[0]]).astype(np.float32)
        name = b.init(f"{fqn}.bias_corrected", (old + v).astype(np.float32))
        node.input[2] = name
    else:
        name = b.init(f"{fqn}.bias", v)
        while len(node.input) < 2:
            node.input.append("")
        node.input.append(name)
    b.graph.inits[name] = b.inits[-1]


def _set_float_weight(b: _Builder, site: WeightSite, weight: torch.Tensor, k: np.ndarray) -> None:
    w = weight.detach().to(torch.float32).contiguous().numpy()
    w = w * k.reshape((-1,) + (1,) * (w.ndim - 1)).astype(np.float32)
    if site.to_module is not None:
        w = w.transpose(site.to_module)
    if site.transposed:
        w = w.T
    name = b.init(f"{site.init_name}_rounded", np.ascontiguousarray(w.astype(np.float32)))
    b.graph.inits[name] = b.inits[-1]
    # the node reads the initializer, possibly through Identity / Transpose: feed it directly in node layout
    if site.transposed:
        name_t, out = b.node("Transpose", [name], f"{site.init_name}_rounded_t", perm=[1, 0])
        b.insert(site.index, [name_t])
        site.node.input[site.weight_index] = out
    else:
        site.node.input[site.weight_index] = name


def _store_int4(proto: onnx.ModelProto, fqns: set[str]) -> tuple[onnx.ModelProto, bool]:
    """The model at opset INT4_OPSET with the integer weights of `fqns` stored as INT4 and widened
    by Cast(to=INT8) before their DequantizeLinear; (the model unchanged, False) where the opset
    converter cannot convert it."""
    onnx, nh = import_onnx()
    from onnx import version_converter

    try:
        out = version_converter.convert_version(proto, INT4_OPSET)
        onnx.checker.check_model(out)
    except Exception:  # noqa: BLE001 - 8-bit storage holds the same values
        return proto, False
    g = out.graph
    inits = {t.name: t for t in g.initializer}
    nodes = []
    replaced: dict[str, Any] = {}
    for n in g.node:
        fqn = n.input[0].removesuffix(".weight_quantized") if n.op_type == "DequantizeLinear" else None
        if fqn in fqns and n.input[0] in inits and inits[n.input[0]].data_type == onnx.TensorProto.INT8:
            for i in (0, 2):
                name = n.input[i]
                if name not in replaced:
                    ints = nh.to_array(inits[name]).astype(np.int16)
                    if ints.min() < -8 or ints.max() > 7:
                        raise InvalidConfigError(f"layer {fqn!r}: weight integers {ints.min()}..{ints.max()} do not fit int4")
                    replaced[name] = onnx.helper.make_tensor(f"{name}_int4", onnx.TensorProto.INT4, ints.shape,
                                                             ints.flatten().tolist())
                    nodes.append(onnx.helper.make_node("Cast", [f"{name}_int4"], [name], to=onnx.TensorProto.INT8,
                                                       name=f"/{name}_widen/Cast"))
        nodes.append(n)
    kept = [t for t in g.initializer if t.name not in replaced]
    del g.initializer[:]
    g.initializer.extend([*kept, *replaced.values()])
    set_nodes(g, nodes)
    onnx.checker.check_model(out)
    return out, True

