"""Model analysis: an nn.Module and an example input -> the quantizable layers, in execution order.

`analyze` runs one forward pass with hooks and returns a `ModelAnalysis`:

- `layers`: one `hw_models.LayerSpec` per quantizable layer (nn.Conv1d, nn.Conv2d including
  grouped and depthwise, nn.Linear, and the projections of nn.MultiheadAttention), in the order
  of their first call. Counts are per sample; a module called several times gives one layer
  whose counts are summed over its calls.
- `unsupported`: modules that hold a weight matrix this analysis cannot price or quantize
  (ConvTranspose*, Conv3d, Embedding, RNN/LSTM/GRU, Bilinear, ...) and handled modules the
  example input never ran. They stay in FP32; nothing is skipped silently.
- `ignored`: modules with weights that are not quantization targets (normalization layers,
  modules whose weights are only 1-D such as PReLU), listed so that nothing is silent either.
- `handles`: per layer, where its weight lives and where its input activation can be caught.

Per-sample counts. The batch size N is the first dimension of the first tensor of the example
input, except when that tensor goes straight into a torch module with `batch_first=False`
(nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoderLayer/DecoderLayer, RNN/LSTM/GRU):
then it is dimension 1 (and N = 1 for an unbatched 2-D input to one of these). Every count is the total over the forward pass divided by N, rounded up when N does
not divide it (a layer run once per batch on a constant, e.g. learned queries). `analyze` takes
`batch_size=` to override the guess.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from hw_models.layers import LayerSpec
from mpsearch.errors import TaskLoadError
from mpsearch.tasks.base import Batch, run_model

__all__ = ["IgnoredModule", "ModelAnalysis", "UnsupportedModule", "WeightHandle", "analyze", "pre_hook"]

NOT_EXECUTED = "not executed by the example input"
NORMALIZATION = "normalization"
ONLY_1D_WEIGHTS = "only 1-D weight parameters (no matrix multiply to quantize)"

_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        nn.LayerNorm,
        nn.GroupNorm,
        getattr(nn, "RMSNorm", None),
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
    )
    if t is not None
)

# torch modules whose `batch_first` flag says where the batch is in their (L, N, E) inputs
_SEQUENCE_TYPES: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.RNNBase,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _batch_first(m: nn.Module) -> bool:
    flag = getattr(m, "batch_first", None)
    if flag is None:  # TransformerEncoderLayer/DecoderLayer keep it on their attention
        flag = getattr(getattr(m, "self_attn", None), "batch_first", False)
    return bool(flag)


@dataclass(frozen=True)
class ModuleNote:
    """A module the search leaves in FP32, and why."""

    fqn: str
    type_name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"fqn": self.fqn, "type_name": self.type_name, "reason": self.reason}


class UnsupportedModule(ModuleNote):
    """A module that holds a weight matrix but is not searched (it stays in FP32)."""


class IgnoredModule(ModuleNote):
    """A module with weights that is not a quantization target (normalization, 1-D weights)."""


@dataclass(frozen=True)
class WeightHandle:
    """Where a layer's weight lives and where its input activation can be intercepted.

    The weight is `getattr(module, param)`: (conv, "weight"), (mha, "in_proj_weight"),
    (mha.out_proj, "weight"), (mha, "q_proj_weight"), ...

    The layer's input is argument `input_arg` of `input_module`'s forward: a position when the
    example input passed it positionally, else its keyword name. Catch it with
    `input_module.register_forward_pre_hook(hook, with_kwargs=True)`. `input_module` is None
    when the input cannot be caught by a hook (the out_proj of nn.MultiheadAttention works on
    the attention output, computed inside F.multi_head_attention_forward).

    other_input_args: further arguments of `input_module` that feed the same weight. Only the
    packed in_proj of nn.MultiheadAttention has them: its weight also projects `key` and
    `value` (the same tensor as the query in self-attention). A hook on `input_arg` alone
    quantizes the query projection's input only.
    """

    module: nn.Module
    param: str
    input_module: nn.Module | None
    input_arg: int | str
    other_input_args: tuple[int | str, ...] = ()

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)


def pre_hook(module: torch.nn.Module, handle_args: tuple[int | str, ...], fn, prepend: bool = False):
    """A forward pre-hook applying fn to the module's inputs `handle_args` (positions or keywords).

    One tensor passed as several arguments (self-attention's query, key and value) is
    transformed once and passed on as one tensor, so `query is key` checks still hold.
    """
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        names = []
    slots = [(a, a if isinstance(a, int) else (names.index(a) if a in names else None)) for a in handle_args]

    def hook(mod, args, kwargs):
        args, kwargs, memo = list(args), dict(kwargs), {}

        def apply(x):
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) not in memo:
                memo[id(x)] = fn(x)
            return memo[id(x)]

        for name, pos in slots:
            if isinstance(name, str) and name in kwargs:
                kwargs[name] = apply(kwargs[name])
            elif pos is not None and pos < len(args):
                args[pos] = apply(args[pos])
        return tuple(args), kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend)


@dataclass(frozen=True)
class ModelAnalysis:
    """The quantizable layers of a model (execution order) and what was left out, and why."""

    layers: tuple[LayerSpec, ...]
    unsupported: tuple[UnsupportedModule, ...] = ()
    ignored: tuple[IgnoredModule, ...] = ()
    handles: Mapping[str, WeightHandle] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "unsupported", tuple(self.unsupported))
        object.__setattr__(self, "ignored", tuple(self.ignored))
        if not isinstance(self.handles, MappingProxyType):
            object.__setattr__(self, "handles", MappingProxyType(dict(self.handles)))

    @property
    def total_macs(self) -> int:
        """Multiply-accumulates per sample over all quantizable layers."""
        return sum(layer.macs for layer in self.layers)

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(layer.fqn for layer in self.layers)

    def layer(self, fqn: str) -> LayerSpec:
        for layer in self.layers:
            if layer.fqn == fqn:
                return layer
        raise KeyError(fqn)

    def to_dict(self) -> dict[str, list]:
        """JSON-ready: layers, unsupported and ignored modules (handles are live objects: left out)."""
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "unsupported": [u.to_dict() for u in self.unsupported],
            "ignored": [i.to_dict() for i in self.ignored],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelAnalysis:
        """The inverse of to_dict, without handles."""
        return cls(
            layers=tuple(LayerSpec.from_dict(x) for x in d["layers"]),
            unsupported=tuple(UnsupportedModule(**x) for x in d.get("unsupported", ())),
            ignored=tuple(IgnoredModule(**x) for x in d.get("ignored", ())),
        )


# --------------------------------------------------------------------------------------------
# analysis


@dataclass
class _Acc:
    """Totals of one layer over the whole forward pass (all calls, whole batch)."""

    owner: nn.Module  # the module whose call this layer is part of
    op: str
    weight_shape: tuple[int, ...]
    groups: int
    handle: WeightHandle
    macs: int = 0
    in_elems: int = 0
    out_elems: int = 0

    def add(self, macs: int, in_elems: int, out_elems: int) -> None:
        self.macs += macs
        self.in_elems += in_elems
        self.out_elems += out_elems


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _arg(args: tuple, kwargs: Mapping[str, Any], pos: int, name: str) -> tuple[Any, int | str]:
    """Argument `name` (position `pos`) of a call, and how it was passed (position or keyword)."""
    if len(args) > pos:
        return args[pos], pos
    return kwargs.get(name), name


def _first_tensor(inputs: Batch) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x
    return None


def _conv_op(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv1d):
        return "conv1d"
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    return None


class _Analyzer:
    def __init__(self, model: nn.Module, first_input: torch.Tensor | None):
        self.model = model
        self.first_input = first_input
        self.names: dict[nn.Module, str] = {}
        for name, m in model.named_modules():
            self.names.setdefault(m, name)
        # out_proj of every MultiheadAttention: priced from the attention call, never hooked
        self.mha_out_projs = {m.out_proj for m in self.names if isinstance(m, nn.MultiheadAttention)}
        self.acc: dict[str, _Acc] = {}  # fqn -> totals, in order of first call
        self.first_call: dict[nn.Module, int] = {}  # module -> rank of its first call
        self.batch_dim_hint: int | None = None  # None: unknown; -1: unbatched
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    # -- hooks ---------------------------------------------------------------------------
    def install(self) -> None:
        for m, name in self.names.items():
            if isinstance(m, nn.MultiheadAttention):
                self.hooks.append(m.register_forward_pre_hook(self._mark_called, with_kwargs=True))
                self.hooks.append(m.register_forward_hook(self._mha_hook(name), with_kwargs=True))
            elif _conv_op(m) is not None and m not in self.mha_out_projs:
                self.hooks.append(m.register_forward_pre_hook(self._mark_called, with_kwargs=True))
                self.hooks.append(m.register_forward_hook(self._layer_hook(name), with_kwargs=True))
            if isinstance(m, _SEQUENCE_TYPES) and self.first_input is not None:
                self.hooks.append(m.register_forward_pre_hook(self._layout_hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def _mark_called(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.first_call.setdefault(module, len(self.first_call))

    def _layout_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Where the batch is in the example input, when a batch_first module consumes it."""
        if self.batch_dim_hint is not None:
            return
        x = self.first_input
        if any(a is x for a in args) or any(a is x for a in kwargs.values()):
            assert x is not None
            if x.dim() < 3:
                self.batch_dim_hint = -1  # unbatched (L, E) input
            else:
                self.batch_dim_hint = 0 if _batch_first(module) else 1

    def _entry(self, fqn: str, make) -> _Acc:
        acc = self.acc.get(fqn)
        if acc is None:
            acc = self.acc[fqn] = make()
        return acc

    def _layer_hook(self, fqn: str):
        def hook(m: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            if args:
                x, how = args[0], 0
            else:  # called as m(input=x)
                how, x = next(iter(kwargs.items()))
            op = _conv_op(m)
            assert op is not None
            w = m.weight
            groups = int(getattr(m, "groups", 1))
            acc = self._entry(
                fqn, lambda: _Acc(m, op, tuple(w.shape), groups, WeightHandle(m, "weight", m, how))
            )
            out = output.numel()
            if op == "linear":
                macs = out * m.in_features
            else:
                macs = out * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            acc.add(macs, x.numel(), out)

        return hook

    def _mha_hook(self, fqn: str):
        def hook(m: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
            q, q_how = _arg(args, kwargs, 0, "query")
            k, k_how = _arg(args, kwargs, 1, "key")
            v, v_how = _arg(args, kwargs, 2, "value")
            e = m.embed_dim
            # tokens over the whole batch, whatever the layout (batch_first or not, unbatched)
            tq, tk, tv = (t.numel() // t.shape[-1] for t in (q, k, v))
            if m._qkv_same_embed_dim:
                distinct: list[torch.Tensor] = []
                for t in (q, k, v):
                    if not any(t is d for d in distinct):
                        distinct.append(t)
                acc = self._entry(
                    _join(fqn, "in_proj"),
                    lambda: _Acc(
                        m,
                        "linear",
                        tuple(m.in_proj_weight.shape),
                        1,
                        WeightHandle(m, "in_proj_weight", m, q_how, (k_how, v_how)),
                    ),
                )
                acc.add((tq + tk + tv) * e * e, sum(t.numel() for t in distinct), (tq + tk + tv) * e)
            else:
                for name, x, how, tokens in (
                    ("q", q, q_how, tq),
                    ("k", k, k_how, tk),
                    ("v", v, v_how, tv),
                ):
                    param = f"{name}_proj_weight"
                    w = getattr(m, param)
                    acc = self._entry(
                        _join(fqn, f"{name}_proj"),
                        lambda param=param, w=w, how=how: _Acc(
                            m, "linear", tuple(w.shape), 1, WeightHandle(m, param, m, how)
                        ),
                    )
                    acc.add(tokens * e * w.shape[1], x.numel(), tokens * e)
            acc = self._entry(
                _join(fqn, "out_proj"),
                lambda: _Acc(
                    m,
                    "linear",
                    tuple(m.out_proj.weight.shape),
                    1,
                    WeightHandle(m.out_proj, "weight", None, 0),
                ),
            )
            acc.add(tq * e * m.out_proj.in_features, tq * m.out_proj.in_features, tq * e)

        return hook

    # -- results -------------------------------------------------------------------------
    def batch_size(self) -> int:
        x = self.first_input
        if x is None or x.dim() == 0 or self.batch_dim_hint == -1:
            return 1
        return int(x.shape[self.batch_dim_hint or 0])

    def ordered(self) -> list[tuple[str, _Acc]]:
        """Layers by the first call of their module (a pre-hook: a caller before its callees)."""
        items = list(self.acc.items())
        rank = {fqn: (self.first_call[a.owner], i) for i, (fqn, a) in enumerate(items)}
        return sorted(items, key=lambda item: rank[item[0]])

    def leftovers(self) -> tuple[list[UnsupportedModule], list[IgnoredModule]]:
        unsupported: list[UnsupportedModule] = []
        ignored: list[IgnoredModule] = []
        for m, name in self.names.items():
            tname = type(m).__name__
            if isinstance(m, nn.MultiheadAttention) or _conv_op(m) is not None:
                if m not in self.first_call and m not in self.mha_out_projs:
                    unsupported.append(UnsupportedModule(name, tname, NOT_EXECUTED))
                continue
            if isinstance(m, _NORM_TYPES):
                ignored.append(IgnoredModule(name, tname, NORMALIZATION))
                continue
            weights = [(n, p) for n, p in m.named_parameters(recurse=False) if "weight" in n.lower()]
            if not weights:
                continue
            if any(p.dim() >= 2 for _, p in weights):
                names = ", ".join(n for n, _ in weights)
                reason = f"unsupported layer type (weights: {names})"
                unsupported.append(UnsupportedModule(name, tname, reason))
            elif "norm" in tname.lower():
                ignored.append(IgnoredModule(name, tname, NORMALIZATION))
            else:
                ignored.append(IgnoredModule(name, tname, ONLY_1D_WEIGHTS))
        return unsupported, ignored


def _per_sample(total: int, n: int) -> int:
    return -(-total // n)  # ceil


def analyze(model: nn.Module, example_input: Batch, *, batch_size: int | None = None) -> ModelAnalysis:
    """List the quantizable layers of `model` by running it once on `example_input`.

    model:         any nn.Module; it runs in eval mode under torch.no_grad, and every
                   submodule's training flag is restored afterwards.
    example_input: one tensor, or a tuple of tensors passed positionally (a task's
                   calibration batch).
    batch_size:    how many samples `example_input` holds, to turn totals into per-sample
                   counts; guessed when None (see the module docstring).

    nn.MultiheadAttention gives `<fqn>.in_proj` (packed q/k/v weight, shape (3E, E)) or
    `<fqn>.q_proj`, `.k_proj`, `.v_proj` (kdim or vdim != embed_dim), then `<fqn>.out_proj`.
    MACs of the input projections: L_q*E*E + L_k*E*kdim + L_v*E*vdim per sample. in_elems of the
    packed in_proj counts every distinct input tensor once: the query alone in self-attention
    (query, key and value the same tensor), query + key in encoder-decoder attention (key is
    value), all three when they are three tensors. Its out_elems is (L_q + L_k + L_v) * E.
    The attention matmuls themselves (Q K^T, A V) hold no weight and are not listed.

    Raises TaskLoadError if the model fails on the example input. A model without quantizable
    layers is not an error: `layers` is empty.
    """
    first = _first_tensor(example_input)
    an = _Analyzer(model, first)
    flags = {m: m.training for m in model.modules()}
    an.install()
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, example_input)
    except Exception as e:
        raise TaskLoadError(f"the model failed on its example input: {type(e).__name__}: {e}") from e
    finally:
        an.remove()
        for m, flag in flags.items():
            m.training = flag

    n = an.batch_size() if batch_size is None else int(batch_size)
    if n <= 0:
        raise TaskLoadError(f"the example input holds no sample (batch size {n})")
    ordered = an.ordered()
    layers = tuple(
        LayerSpec(
            fqn=fqn,
            op=a.op,
            weight_shape=a.weight_shape,
            groups=a.groups,
            macs=_per_sample(a.macs, n),
            in_elems=_per_sample(a.in_elems, n),
            out_elems=_per_sample(a.out_elems, n),
        )
        for fqn, a in ordered
    )
    unsupported, ignored = an.leftovers()
    return ModelAnalysis(
        layers=layers,
        unsupported=tuple(unsupported),
        ignored=tuple(ignored),
        handles=MappingProxyType({fqn: a.handle for fqn, a in ordered}),
    )
