"""Which tensors the deployed graph of a configuration quantizes: one rule for export, simulation
and pricing.

A deployment runtime (ONNX Runtime, TensorRT, OpenVINO) runs a layer on int8 kernels when its
input, its weight and its output are int8, and keeps int8 regions int8 end to end: a residual
Add, a pooling or a concatenation whose inputs are all int8 runs on int8 too (QLinearAdd,
QLinearGlobalAveragePool, ...). A configuration says, per layer, weight and input precision;
`DeployGraph.plan` turns it into the tensors that graph quantizes:

1. An *int8 layer* is a layer with an integer weight (int2..int8) and an int8 input. Its input is
   quantized (uint8, per tensor); when it is a convolution, so is its output, after the
   activations a runtime fuses into it (Relu, Clip): ONNX Runtime has no int8 convolution with a
   float output, so without a quantized output it runs a float convolution on dequantized
   weights. A matrix multiply (Gemm / MatMul) has int8 kernels with a float output (QGemm,
   MatMulIntegerToFloat): its output stays float unless a Relu / Clip follows it (fused into the
   int8 kernel only with a quantized output) or its consumer quantizes it.
2. An Add, GlobalAveragePool, AveragePool, MaxPool or Concat whose data inputs are all quantized
   tensors runs int8: its output (after a fused Relu / Clip) is quantized too.
3. Tensors reach their consumers through Flatten / Reshape / Squeeze / Unsqueeze / Transpose /
   Identity unchanged: those ops move quantized values as they are.
4. A quantized tensor is quantized once, where it is produced, and every consumer sees the int8
   values: an fp32 layer after an int8 one reads a dequantized int8 tensor (one DequantizeLinear
   at the boundary), an int8 layer after an fp32 one quantizes its own input (one QuantizeLinear).
5. A layer whose input is at another precision (int4, fp8, ... on targets that run them) has
   its input quantized at that precision; nothing else changes around it.

Simulation. Every quantized tensor is simulated by the evaluator's hooks on the FP32 model, so
each one needs a hook point (`Point`): the input quantizers of the layers that consume it, when
all its consumers are such layers ("in"), else a forward hook on the module whose output it is
("out"; the module is found by comparing the values of every module's output with the tensor's
value in ONNX Runtime on the example batch). A tensor with no hook point is not quantized: an
int8 convolution whose output cannot be simulated keeps a float output (ONNX Runtime then runs a
float convolution on its dequantized weights), and the plan says so in `Plan.notes`.

The graph the rule reads is the FP32 model exported to ONNX (mpsearch.scoring.onnx_graph.read_graph),
the same export the deployed graph is built from (mpsearch.deploy.build), so simulation,
deployment and pricing read one structure. `DeployGraph` holds only plain data (node names, op
types, tensor names and sizes, hook points) and round-trips through `to_dict`, so the evaluator
keeps it in its disk cache; it lives here, with the hardware models, because the cost model prices
a configuration's precision boundaries on it (`boundaries`: where a QuantizeLinear or a
DequantizeLinear runs), and hw_models imports nothing of mpsearch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hw_models.layers import LayerChoice
from hw_models.precision import Precision

__all__ = ["PLAN_VERSION", "Boundary", "DeployGraph", "GraphNode", "Plan", "Point"]

PLAN_VERSION = 2
LAYER_OPS = ("Conv", "Gemm", "MatMul")
FUSED_ACTIVATIONS = ("Relu", "Clip")
INT8_OPS = ("Add", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat")
TRANSPARENT = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Dropout")
INT8 = Precision.INT8
FP32 = Precision.FP32


@dataclass(frozen=True)
class GraphNode:
    """One node of the FP32 graph: its float data inputs and its (first) output.

    layer: the quantizable layer (fqn) whose weight the node consumes, when it is one."""

    name: str
    op: str
    inputs: tuple[str, ...]
    output: str
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "output": self.output,
                "layer": self.layer}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphNode:
        return cls(d["name"], d["op"], tuple(d["inputs"]), d["output"], d.get("layer"))


@dataclass(frozen=True)
class Point:
    """Where the simulation quantizes a tensor: kind "in", the input quantizers of the layers
    `names` (they are its only consumers); kind "out", a forward hook on module `names[0]`
    ("" is the model itself)."""

    kind: str
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.kind not in ("in", "out") or (self.kind == "out" and len(self.names) != 1):
            raise ValueError(f"bad hook point {self.kind} {self.names}")

    def to_list(self) -> list:
        return [self.kind, list(self.names)]

    @classmethod
    def from_list(cls, v: Sequence) -> Point:
        return cls(v[0], tuple(v[1]))


@dataclass(frozen=True)
class Plan:
    """The tensors the deployed graph of one configuration quantizes (module doc).

    int8_layers: the layers that run on int8 kernels.
    tensors:     quantized tensor (ONNX name) -> the hook point whose int8 parameters quantize
                 it; quantized where it is produced, every consumer sees the int8 values.
    edges:       layer -> precision of a quantizer on that layer's own input (an int8 layer
                 whose input is not a quantized tensor; another activation precision).
    notes:       layer -> why it does not run as asked (e.g. its output has no hook point).
    """

    int8_layers: frozenset[str]
    tensors: Mapping[str, Point]
    edges: Mapping[str, Precision]
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def sim_inputs(self) -> dict[str, Precision]:
        """Layer input quantizers the simulation turns on: layer -> precision."""
        out = {f: INT8 for p in self.tensors.values() if p.kind == "in" for f in p.names}
        out.update(self.edges)  # a layer's own precision wins over the int8 of its producer
        return out

    @property
    def sim_outputs(self) -> frozenset[str]:
        """Modules whose output the simulation quantizes to int8."""
        return frozenset(p.names[0] for p in self.tensors.values() if p.kind == "out")


@dataclass(frozen=True)
class Boundary:
    """Where a deployed graph converts between float and int8: kind "q" (a QuantizeLinear on the
    input of `layer`, an int8 layer reading a float tensor) or "dq" (a DequantizeLinear: a
    quantized tensor read by a float op); `elems` per sample; `layer` the layer it is charged to
    (the int8 layer of a "q", the layer producing a "dq"'s tensor, else its first float reader;
    None when no layer is near)."""

    kind: str
    tensor: str
    elems: int
    layer: str | None


class DeployGraph:
    """The FP32 graph's structure as the quantization rule reads it, and its hook points.

    nodes:   every node with a float output, in topological order (GraphNode).
    outputs: the graph's outputs.
    points:  tensor -> Point, for every tensor rule 1 or 2 may quantize that can be simulated.
    elems:   tensor -> elements per sample (where shape inference knows them).
    sites:   layers found in the graph (one node each); others are treated by rule 5 only.
    """

    def __init__(self, nodes: Sequence[GraphNode], outputs: Sequence[str], points: Mapping[str, Point],
                 note: str = "", elems: Mapping[str, int] | None = None):
        self.nodes = tuple(nodes)
        self.outputs = tuple(outputs)
        self.points = dict(points)
        self.note = note
        self.elems = dict(elems or {})
        self.producer = {n.output: n for n in self.nodes}
        self.consumers: dict[str, list[tuple[GraphNode, int]]] = defaultdict(list)
        for n in self.nodes:
            for i, t in enumerate(n.inputs):
                self.consumers[t].append((n, i))
        self.sites = {n.layer: n for n in self.nodes if n.layer is not None}

    # -- structure ------------------------------------------------------------------------
    def source(self, tensor: str) -> str:
        """The tensor a value comes from through TRANSPARENT ops."""
        for _ in range(64):
            n = self.producer.get(tensor)
            if n is None or n.op not in TRANSPARENT or not n.inputs:
                return tensor
            tensor = n.inputs[0]
        return tensor

    def tail(self, tensor: str) -> str:
        """The tensor after the Relu / Clip chain a runtime fuses into the producer of `tensor`
        (each the only consumer of the one before)."""
        for _ in range(64):
            users = self.consumers.get(tensor, [])
            if len(users) != 1 or tensor in self.outputs:
                return tensor
            n, i = users[0]
            if n.op not in FUSED_ACTIVATIONS or i != 0:
                return tensor
            tensor = n.output
        return tensor

    def readers(self, tensor: str) -> tuple[list[str], bool]:
        """(layers reading `tensor` as their data input through TRANSPARENT ops, whether anything
        else reads it: another op, a layer's other input, a graph output)."""
        layers: list[str] = []
        other = False
        todo = [tensor]
        while todo:
            t = todo.pop()
            if t in self.outputs:
                other = True
            for n, i in self.consumers.get(t, []):
                if n.op in TRANSPARENT and i == 0:
                    todo.append(n.output)
                elif n.layer is not None and i == 0:
                    layers.append(n.layer)
                else:
                    other = True
        return layers, other

    def candidates(self) -> list[str]:
        """Tensors rules 1 and 2 may quantize: the tails of convolutions, of matrix multiplies
        followed by a Relu / Clip, and of INT8_OPS."""
        out = []
        for n in self.nodes:
            t = self.tail(n.output)
            if (n.layer is not None and (n.op == "Conv" or t != n.output)) or n.op in INT8_OPS:
                out.append(t)
        return list(dict.fromkeys(out))

    # -- the rule -------------------------------------------------------------------------
    def plan(self, choices: Mapping[str, LayerChoice]) -> Plan:
        """The tensors the deployed graph of `choices` (layer -> weight / activation) quantizes."""
        int8 = frozenset(f for f, c in choices.items()
                         if f in self.sites and c.weight.is_int and c.weight.bits <= 8 and c.activation == INT8)
        quantized: dict[str, Point] = {}
        edges: dict[str, Precision] = {}
        notes: dict[str, str] = {}
        for n in self.nodes:
            if n.layer is not None:
                if n.layer not in int8:
                    continue
                if self.source(n.inputs[0]) not in quantized:
                    edges[n.layer] = INT8
                t = self.tail(n.output)
                if n.op == "Conv" or t != n.output:
                    p = self.points.get(t)
                    if p is None:
                        notes[n.layer] = ("no module of the model returns its output, so its int8 output cannot be "
                                          "simulated: it is deployed with a float output (ONNX Runtime runs a float "
                                          "convolution on its dequantized weights)")
                    else:
                        quantized[t] = p
            elif n.op in INT8_OPS and n.inputs and all(self.source(t) in quantized for t in n.inputs):
                t = self.tail(n.output)
                p = self.points.get(t)
                if p is not None:
                    quantized[t] = p
        for f, c in choices.items():
            if f not in int8 and c.activation != FP32:
                edges[f] = c.activation  # rule 5 (and int8 inputs of float-weight layers)
        return Plan(int8, quantized, edges, notes)

    def boundaries(self, plan: Plan) -> list[Boundary]:
        """Where the deployed graph of `plan` converts between float and int8 (module doc, rule 4):
        a QuantizeLinear on each int8 input edge, a DequantizeLinear on each quantized tensor that a
        float op (an fp32 layer, an Add or pooling left float, the graph's output) reads."""
        out = []
        for f, p in plan.edges.items():
            site = self.sites.get(f)
            if p == INT8 and site is not None:
                t = self.source(site.inputs[0])
                out.append(Boundary("q", t, self.elems.get(t, 0), f))
        for t in plan.tensors:
            readers = []
            todo = [t]
            while todo:
                x = todo.pop()
                if x in self.outputs:
                    readers.append(None)
                for n, i in self.consumers.get(x, []):
                    if n.op in TRANSPARENT and i == 0:
                        todo.append(n.output)
                    elif n.layer is not None and i == 0:
                        if n.layer not in plan.int8_layers:
                            readers.append(n.layer)
                    elif not (n.op in INT8_OPS and self.tail(n.output) in plan.tensors):
                        readers.append("")
            if readers:
                producer = self.producer.get(t)
                while producer is not None and producer.layer is None and producer.op in FUSED_ACTIVATIONS:
                    producer = self.producer.get(producer.inputs[0])
                owner = producer.layer if producer is not None and producer.layer else next(
                    (r for r in readers if r), None)
                out.append(Boundary("dq", t, self.elems.get(t, 0), owner))
        return out

    # -- plain data -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "nodes": [n.to_dict() for n in self.nodes],
            "outputs": list(self.outputs),
            "points": {t: p.to_list() for t, p in self.points.items()},
            "note": self.note,
            "elems": dict(self.elems),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeployGraph:
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"deploy graph version {d.get('version')!r}, expected {PLAN_VERSION}")
        return cls([GraphNode.from_dict(x) for x in d["nodes"]], d["outputs"],
                   {t: Point.from_list(p) for t, p in d["points"].items()}, d.get("note", ""), d.get("elems"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeployGraph) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:  # pragma: no cover - not used as a key
        return hash(tuple(self.nodes))
