"""Numeric precisions a layer's weights or activations can take."""

from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """A number format, named as users write it ("int4", "fp8_e4m3", ...)."""

    INT2 = "int2"
    INT3 = "int3"
    INT4 = "int4"
    INT6 = "int6"
    INT8 = "int8"
    INT16 = "int16"
    FP8_E4M3 = "fp8_e4m3"
    FP16 = "fp16"
    BF16 = "bf16"
    FP32 = "fp32"

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def is_int(self) -> bool:
        return self.value.startswith("int")

    @property
    def is_float(self) -> bool:
        return not self.is_int

    @classmethod
    def parse(cls, name: str) -> Precision:
        """Parse a precision name; raises ValueError naming the known ones."""
        try:
            return cls(name.strip().lower())
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise ValueError(f"unknown precision {name!r} (known: {known})") from None

    def __str__(self) -> str:  # "int4", not "Precision.INT4"
        return self.value


_BITS = {
    Precision.INT2: 2,
    Precision.INT3: 3,
    Precision.INT4: 4,
    Precision.INT6: 6,
    Precision.INT8: 8,
    Precision.INT16: 16,
    Precision.FP8_E4M3: 8,
    Precision.FP16: 16,
    Precision.BF16: 16,
    Precision.FP32: 32,
}
