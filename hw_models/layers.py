"""What the hardware side knows about a layer and about a candidate configuration."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass

from hw_models.precision import Precision

OPS = ("conv1d", "conv2d", "linear")


@dataclass(frozen=True)
class LayerSpec:
    """One quantizable layer, per sample (batch size 1).

    fqn: fully-qualified module name ("features.3.conv.0.0", "attn.in_proj").
    op: "conv1d", "conv2d" or "linear".
    weight_shape: shape of the weight tensor (out, in/groups, *kernel) or (out, in).
    groups: convolution groups (1 for linear).
    macs: multiply-accumulates per sample.
    in_elems / out_elems: input / output activation elements per sample.
    """

    fqn: str
    op: str
    weight_shape: tuple[int, ...]
    groups: int
    macs: int
    in_elems: int
    out_elems: int

    @property
    def weight_elems(self) -> int:
        n = 1
        for d in self.weight_shape:
            n *= d
        return n

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerSpec:
        return cls(
            fqn=str(d["fqn"]),
            op=str(d["op"]),
            weight_shape=tuple(int(x) for x in d["weight_shape"]),
            groups=int(d["groups"]),
            macs=int(d["macs"]),
            in_elems=int(d["in_elems"]),
            out_elems=int(d["out_elems"]),
        )


@dataclass(frozen=True)
class LayerChoice:
    """The precision of one layer's weights and of its input activations."""

    weight: Precision
    activation: Precision

    def to_dict(self) -> dict[str, str]:
        return {"weight": self.weight.value, "activation": self.activation.value}


class Candidate(Mapping[str, LayerChoice]):
    """An immutable, hashable map fqn -> LayerChoice, in layer order.

    Two candidates with the same choices are equal and hash alike, so an identical
    candidate is scored once.
    """

    __slots__ = ("_hash", "_index", "_items", "_json")

    def __init__(self, choices: Mapping[str, LayerChoice] | Iterable[tuple[str, LayerChoice]]):
        items = tuple(choices.items() if isinstance(choices, Mapping) else choices)
        self._items = items
        self._index = dict(items)
        self._hash = hash(items)
        self._json: str | None = None

    def __getitem__(self, fqn: str) -> LayerChoice:
        return self._index[fqn]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and self._items == other._items

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}: w={c.weight}/a={c.activation}" for k, c in self._items)
        return f"Candidate({inner})"

    @classmethod
    def uniform(cls, fqns: Iterable[str], weight: Precision, activation: Precision) -> Candidate:
        choice = LayerChoice(weight, activation)
        return cls((f, choice) for f in fqns)

    def to_dict(self) -> dict[str, dict[str, str]]:
        return {k: c.to_dict() for k, c in self._items}

    def to_json(self) -> str:
        """to_dict() as compact JSON, computed once (a candidate is immutable)."""
        if self._json is None:
            self._json = json.dumps(self.to_dict())
        return self._json

    @classmethod
    def from_dict(cls, d: Mapping[str, Mapping[str, str]]) -> Candidate:
        return cls(
            (fqn, LayerChoice(Precision.parse(c["weight"]), Precision.parse(c["activation"])))
            for fqn, c in d.items()
        )
