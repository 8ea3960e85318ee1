"""Per-layer precision choices on a target, and their mapping to Optuna distributions."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import optuna

from hw_models import Candidate, HardwareProfile, LayerChoice, LayerSpec, Precision

P = Precision

DEFAULT_WEIGHT_PRECISIONS = (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8, P.FP32)
DEFAULT_ACTIVATION_PRECISIONS = (P.INT8, P.FP32)


class SpaceError(ValueError):
    """A search space that cannot be built (no choice left for a layer, unknown layer, ...)."""


@dataclass(frozen=True)
class LayerOptions:
    """The (weight, activation) pairs one layer may take."""

    fqn: str
    pairs: tuple[LayerChoice, ...]
    note: str = ""

    @property
    def weights(self) -> tuple[Precision, ...]:
        return tuple(dict.fromkeys(c.weight for c in self.pairs))

    @property
    def activations(self) -> tuple[Precision, ...]:
        return tuple(dict.fromkeys(c.activation for c in self.pairs))

    @property
    def size(self) -> int:
        return len(self.pairs)

    @property
    def is_product(self) -> bool:
        """Whether the pairs are every weight with every activation (two independent parameters)."""
        return len(self.pairs) == len(self.weights) * len(self.activations)


def _param(kind: str, fqn: str) -> str:
    return f"{kind}:{fqn}"


def _pair_name(c: LayerChoice) -> str:
    return f"{c.weight.value}/{c.activation.value}"


class SearchSpace:
    """Which (weight, activation) precision pairs each layer may take on a target.

    Each layer gets the pairs the target runs whose weight is among `weight_precisions` and
    whose activation is among `activation_precisions` (None: every precision the target runs
    for that side). Layers whose input activation cannot be quantized (listed in
    `fp32_activation_layers`, e.g. the output projection inside nn.MultiheadAttention) keep
    fp32 activations.

    Space reduction: `ties` are groups of layers that must share one pair (tied weights, branches
    a runtime fuses): they get the pairs every member allows and one set of parameters, named
    after the group's first layer in execution order. `pins` fix a layer to one pair (for example
    the first and last layers at int8). `size` counts what is left; `unreduced_size` what the
    target and precision lists alone allow.

    Optuna parameters: when a layer's pairs are every listed weight with every listed activation
    (a CPU's int8 / fp32 space), two categoricals "w:<fqn>" and "a:<fqn>"; otherwise (a GPU runs
    int4 weights with bf16 activations but not with fp32 ones) one categorical "p:<fqn>" over
    "weight/activation" names, so that no unsupported pair is ever proposed. A parameter with a
    single option is fixed and not searched.
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        profile: HardwareProfile,
        weight_precisions: Iterable[Precision] | None = None,
        activation_precisions: Iterable[Precision] | None = None,
        fp32_activation_layers: Iterable[str] = (),
        ties: Iterable[Sequence[str]] = (),
        pins: Mapping[str, LayerChoice] | None = None,
    ):
        self.layers = tuple(layers)
        self.profile = profile
        self.requested_weights = (tuple(weight_precisions) if weight_precisions
                                  else profile.default_weight_precisions)
        self.requested_activations = (
            tuple(activation_precisions) if activation_precisions else profile.activation_precisions
        )
        fp32_act = set(fp32_activation_layers)
        if not self.layers:
            raise SpaceError("the model has no quantizable layer")
        options = []
        for layer in self.layers:
            acts = self.requested_activations
            note = ""
            if layer.fqn in fp32_act:
                acts = (P.FP32,)
                note = "input activation cannot be intercepted: fp32 only"
            pairs = tuple(
                LayerChoice(w, a) for w in self.requested_weights for a in acts if profile.rule(w, a)
            )
            if not pairs:
                raise SpaceError(
                    f"layer {layer.fqn}: {profile.name} runs none of the requested precisions "
                    f"(weights {_names(self.requested_weights)}, activations {_names(acts)}); "
                    f"it runs weights {_names(profile.weight_precisions)} and activations "
                    f"{_names(profile.activation_precisions)}"
                )
            options.append(LayerOptions(layer.fqn, pairs, note))
        self.unreduced_log10_size = sum(math.log10(o.size) for o in options)
        by_fqn = {o.fqn: o for o in options}
        order = {o.fqn: i for i, o in enumerate(options)}
        self.pins = dict(pins or {})
        for fqn, choice in self.pins.items():
            if fqn not in by_fqn:
                raise SpaceError(f"cannot pin layer {fqn!r}: the model has no such quantizable layer")
            if choice not in by_fqn[fqn].pairs:
                raise SpaceError(f"cannot pin layer {fqn} to {_pair_name(choice)}: its options are "
                                 f"{', '.join(_pair_name(c) for c in by_fqn[fqn].pairs)}")
            by_fqn[fqn] = LayerOptions(fqn, (choice,), "pinned")
        # tie groups: merged when they share a layer, members in execution order
        groups: list[list[str]] = []
        for tie in ties:
            tie = list(dict.fromkeys(tie))
            for fqn in tie:
                if fqn not in by_fqn:
                    raise SpaceError(f"cannot tie layer {fqn!r}: the model has no such quantizable layer")
            if len(tie) < 2:
                continue
            hit = [g for g in groups if set(g) & set(tie)]
            merged = set(tie).union(*hit) if hit else set(tie)
            groups = [g for g in groups if g not in hit] + [sorted(merged, key=order.__getitem__)]
        self.ties = tuple(tuple(g) for g in sorted(groups, key=lambda g: order[g[0]]))
        self._leader = {}
        for g in self.ties:
            common = [c for c in by_fqn[g[0]].pairs if all(c in by_fqn[f].pairs for f in g[1:])]
            if not common:
                raise SpaceError(f"tied layers {', '.join(g)} have no precision pair in common")
            for f in g:
                note = (by_fqn[f].note or f"tied to {g[0]}") if f != g[0] else by_fqn[f].note
                by_fqn[f] = LayerOptions(f, tuple(common), note)
                self._leader[f] = g[0]
        self.options = tuple(by_fqn[o.fqn] for o in options)
        self._by_fqn = {o.fqn: o for o in self.options}

    @property
    def fqns(self) -> tuple[str, ...]:
        return tuple(o.fqn for o in self.options)

    @property
    def free(self) -> tuple[LayerOptions, ...]:
        """The layers whose choice is searched independently (a tie group's first layer)."""
        return tuple(o for o in self.options if self._leader.get(o.fqn, o.fqn) == o.fqn)

    @property
    def size(self) -> int:
        """Number of distinct candidates (product of the free layers' choices)."""
        return math.prod(o.size for o in self.free)

    @property
    def log10_size(self) -> float:
        return sum(math.log10(o.size) for o in self.free)

    def leader(self, fqn: str) -> str:
        """The layer whose parameters decide `fqn`'s pair (itself unless tied)."""
        return self._leader.get(fqn, fqn)

    def enumerate(self) -> Iterator[Candidate]:
        """Every candidate of the space (there are `size` of them)."""
        free = self.free
        for combo in itertools.product(*(o.pairs for o in free)):
            chosen = {o.fqn: c for o, c in zip(free, combo, strict=True)}
            yield Candidate((o.fqn, chosen[self.leader(o.fqn)]) for o in self.options)

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Optuna distributions of the searched parameters (fixed ones left out)."""
        cat = optuna.distributions.CategoricalDistribution
        dists: dict[str, optuna.distributions.BaseDistribution] = {}
        for o in self.free:
            if not o.is_product:
                dists[_param("p", o.fqn)] = cat([_pair_name(c) for c in o.pairs])
                continue
            if len(o.weights) > 1:
                dists[_param("w", o.fqn)] = cat([p.value for p in o.weights])
            if len(o.activations) > 1:
                dists[_param("a", o.fqn)] = cat([p.value for p in o.activations])
        return dists

    def candidate(self, params: Mapping[str, str]) -> Candidate:
        """The candidate an Optuna trial's parameters describe."""
        chosen = {}
        for o in self.free:
            if not o.is_product:
                w, a = params[_param("p", o.fqn)].split("/")
            else:
                w = params.get(_param("w", o.fqn), o.weights[0].value)
                a = params.get(_param("a", o.fqn), o.activations[0].value)
            chosen[o.fqn] = LayerChoice(P(w), P(a))
        return Candidate((o.fqn, chosen[self.leader(o.fqn)]) for o in self.options)

    def params(self, candidate: Candidate) -> dict[str, str]:
        """Inverse of `candidate`: the Optuna parameters for a candidate in this space."""
        out = {}
        for o in self.options:
            c = candidate[o.fqn]
            if c not in o.pairs:
                raise SpaceError(f"layer {o.fqn}: {c.weight}/{c.activation} is outside the space")
            lead = self.leader(o.fqn)
            if lead != o.fqn:
                if candidate[lead] != c:
                    raise SpaceError(f"layer {o.fqn} is tied to {lead} but has another precision pair")
                continue
            if not o.is_product:
                out[_param("p", o.fqn)] = _pair_name(c)
                continue
            if len(o.weights) > 1:
                out[_param("w", o.fqn)] = c.weight.value
            if len(o.activations) > 1:
                out[_param("a", o.fqn)] = c.activation.value
        return out

    def uniform(self, weight: Precision, activation: Precision) -> Candidate:
        """Every layer at (weight, activation) where the layer allows it, else its pair with that
        weight (or, failing that, the widest pair)."""
        choices = []
        for o in self.options:
            want = LayerChoice(weight, activation)
            if want not in o.pairs:
                same_w = [c for c in o.pairs if c.weight == weight]
                want = max(same_w or o.pairs, key=lambda c: (c.activation.bits, c.weight.bits, c.activation.is_float))
            choices.append((o.fqn, want))
        return Candidate(choices)

    def layer_choices(self, fqn: str) -> list[LayerChoice]:
        return list(self._by_fqn[fqn].pairs)

    def describe(self) -> dict:
        return {
            "size": self.size,
            "log10_size": round(self.log10_size, 3),
            "log10_size_unreduced": round(self.unreduced_log10_size, 3),
            "ties": [list(g) for g in self.ties],
            "pins": {f: _pair_name(c) for f, c in self.pins.items()},
            "weight_precisions": _names(self.requested_weights).split(","),
            "activation_precisions": _names(self.requested_activations).split(","),
            "layers": [
                {
                    "fqn": o.fqn,
                    "weights": [p.value for p in o.weights],
                    "activations": [p.value for p in o.activations],
                    **({} if o.is_product else {"pairs": [_pair_name(c) for c in o.pairs]}),
                    **({"note": o.note} if o.note else {}),
                }
                for o in self.options
            ],
        }


def _names(ps: Iterable[Precision]) -> str:
    return ",".join(p.value for p in ps)
