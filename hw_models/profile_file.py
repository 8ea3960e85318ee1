"""Hardware profiles as TOML files: `mpsearch calibrate` writes them, `--target FILE.toml` reads them.

Layout (every number in SI units; see HardwareProfile for what each field means):

    name = "my-cpu"
    kind = "cpu"
    description = "..."
    threads = 2                          # optional
    mem_bw_bytes_per_s = 2.0e10
    layer_overhead_s = 4.0e-6
    transition_overhead_s = 4.0e-6       # optional (0)
    transition_bytes_per_elem = 13.0     # optional (0)
    quantize_bytes_per_elem = 2.0        # optional: the deployed graph's QuantizeLinear (default: transition's)
    dequantize_bytes_per_elem = 9.0      # optional: its DequantizeLinear (default: transition's)
    io_compute = "fp32"                  # optional
    on_chip_bytes = 18874368             # optional, as are off_chip_bytes, weight_capacity_bytes,
                                         # act_capacity_bytes, energy_pj_per_byte
    [peak_macs_per_s]                    # MAC/s per compute kind
    int8 = 6.4e11
    [efficiency]                         # share of peak per compute kind, in (0, 1]
    int8 = 0.25
    [energy_pj_per_mac]                  # optional
    [sources]                            # where each figure comes from
    rules = [                            # one per runnable (weight, activation) pair ([[rules]] tables too)
        { weight = "int8", activation = "int8", compute = "int8", native = true },
        # optional: kernel = "weight_only" (whose [efficiency] applies; default: compute's),
        # storage = "int4" (the format the weight is stored in; default: weight)
    ]
    [layer_table]                        # optional: measured per-layer latency (lookup mode)
    batch_size = 1
    other_s = 1.2e-4                     # the model's operations that are not layers
    [layer_table.layers."features.0.0"]
    macs = 5419008
    fp32 = 1.1e-4
    int8 = 6.0e-5

Errors name the file and the field: a missing, negative or non-numeric figure, one outside its
physical bounds (hw_models.profile.FIGURE_BOUNDS: the value and the allowed range), an unknown
precision, a rule whose compute kind has no throughput.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from hw_models.precision import Precision
from hw_models.profile import ExecRule, HardwareProfile, LayerTable

_NUMBERS = ("mem_bw_bytes_per_s", "layer_overhead_s")
_OPTIONAL_NUMBERS = ("transition_overhead_s", "transition_bytes_per_elem", "quantize_bytes_per_elem",
                     "dequantize_bytes_per_elem", "energy_pj_per_byte")
_OPTIONAL_INTS = ("threads", "on_chip_bytes", "off_chip_bytes", "weight_capacity_bytes", "act_capacity_bytes")


class ProfileFileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


def load_profile(path: str | Path) -> HardwareProfile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileFileError(f"{path}: no such profile file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileFileError(f"{path}: cannot read it ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileFileError(f"{path}: not valid TOML ({e})") from None
    return profile_from_dict(data, str(path))


def profile_from_dict(data: dict[str, Any], where: str = "profile") -> HardwareProfile:
    def fail(field: str, msg: str):
        raise ProfileFileError(f"{where}: field {field}: {msg}")

    def text(field: str, default: str | None = None) -> str:
        v = data.get(field, default)
        if v is None:
            fail(field, "missing")
        if not isinstance(v, str):
            fail(field, f"expected a string, got {v!r}")
        return v

    def number(field: str, v: Any, positive: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            fail(field, f"expected a number, got {v!r}")
        if v < 0 or (positive and v == 0):
            fail(field, f"must be {'positive' if positive else '>= 0'}, got {v!r}")
        return float(v)

    def table(field: str, required: bool = True) -> dict[str, Any]:
        v = data.get(field)
        if v is None:
            if required:
                fail(field, "missing")
            return {}
        if not isinstance(v, dict):
            fail(field, f"expected a table, got {v!r}")
        return v

    def precision(field: str, v: Any) -> Precision:
        try:
            return Precision.parse(v) if isinstance(v, str) else fail(field, f"expected a precision name, got {v!r}")
        except ValueError as e:
            fail(field, str(e))

    kw: dict[str, Any] = {"name": text("name"), "kind": text("kind"), "description": text("description", "")}
    kw["io_compute"] = text("io_compute", "fp32")
    for f in _NUMBERS:
        if f not in data:
            fail(f, "missing")
        kw[f] = number(f, data[f], positive=f == "mem_bw_bytes_per_s")
    for f in _OPTIONAL_NUMBERS:
        if f in data:
            kw[f] = number(f, data[f])
    for f in _OPTIONAL_INTS:
        if f in data:
            v = data[f]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                fail(f, f"expected a positive integer, got {v!r}")
            kw[f] = v
    kw["peak_macs_per_s"] = {k: number(f"peak_macs_per_s.{k}", v, positive=True)
                             for k, v in table("peak_macs_per_s").items()}
    kw["efficiency"] = {k: number(f"efficiency.{k}", v, positive=True) for k, v in table("efficiency").items()}
    for k, v in kw["efficiency"].items():
        if v > 1:
            fail(f"efficiency.{k}", f"must be in (0, 1], got {v!r}")
    kw["energy_pj_per_mac"] = {k: number(f"energy_pj_per_mac.{k}", v)
                               for k, v in table("energy_pj_per_mac", required=False).items()}
    kw["sources"] = {k: str(v) for k, v in table("sources", required=False).items()}
    rules_data = data.get("rules")
    if not isinstance(rules_data, list) or not rules_data:
        fail("rules", "missing or empty (one [[rules]] table per runnable weight / activation pair)")
    rules = []
    for i, r in enumerate(rules_data):
        f = f"rules[{i}]"
        if not isinstance(r, dict):
            fail(f, f"expected a table, got {r!r}")
        for key in ("weight", "activation", "compute"):
            if key not in r:
                fail(f"{f}.{key}", "missing")
        compute = r["compute"]
        if compute not in kw["peak_macs_per_s"]:
            fail(f"{f}.compute", f"{compute!r} has no throughput in [peak_macs_per_s]")
        native = r.get("native", True)
        if not isinstance(native, bool):
            fail(f"{f}.native", f"expected true or false, got {native!r}")
        kernel = r.get("kernel", "")
        if not isinstance(kernel, str):
            fail(f"{f}.kernel", f"expected a kernel name (a key of [efficiency]), got {kernel!r}")
        storage = precision(f"{f}.storage", r["storage"]) if "storage" in r else None
        rules.append(ExecRule(precision(f"{f}.weight", r["weight"]), precision(f"{f}.activation", r["activation"]),
                              compute, native, kernel, storage))
    kw["rules"] = tuple(rules)
    lt = table("layer_table", required=False)
    if lt:
        layers = {}
        for fqn, entry in (lt.get("layers") or {}).items():
            f = f"layer_table.layers.{fqn}"
            if not isinstance(entry, dict) or "macs" not in entry:
                fail(f, "expected a table with macs and a latency per compute kind")
            layers[fqn] = {k: number(f"{f}.{k}", v) for k, v in entry.items()}
        bs = lt.get("batch_size", 1)
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            fail("layer_table.batch_size", f"expected a positive integer, got {bs!r}")
        kw["layer_table"] = LayerTable(layers, bs, number("layer_table.other_s", lt.get("other_s", 0.0)))
    kw["sources"].setdefault("efficiency", f"from {where}")
    try:
        profile = HardwareProfile(**kw)
        profile.check_bounds()
    except ValueError as e:
        raise ProfileFileError(f"{where}: {e}") from None
    return profile


def dump_profile(profile: HardwareProfile) -> str:
    """The profile as TOML text (tomli-w; `load_profile` reads it back to an equal profile)."""
    data: dict[str, Any] = {"name": profile.name, "kind": profile.kind, "description": profile.description,
                            "io_compute": profile.io_compute}
    for f in (*_NUMBERS, *_OPTIONAL_NUMBERS, *_OPTIONAL_INTS):
        v = getattr(profile, f)
        if v is not None:
            data[f] = v
    for section in ("peak_macs_per_s", "efficiency", "energy_pj_per_mac", "sources"):
        values = getattr(profile, section)
        if values:
            data[section] = dict(values)
    rules = []
    for r in profile.rules:
        rule: dict[str, Any] = {"weight": r.weight.value, "activation": r.activation.value, "compute": r.compute,
                                "native": r.native}
        if r.kernel:
            rule["kernel"] = r.kernel
        if r.storage is not None:
            rule["storage"] = r.storage.value
        rules.append(rule)
    data["rules"] = rules
    t = profile.layer_table
    if t is not None:
        data["layer_table"] = {
            "batch_size": t.batch_size, "other_s": t.other_s,
            "layers": {fqn: {k: int(v) if k == "macs" else v for k, v in entry.items()} for fqn, entry in t.layers.items()},
        }
    return tomli_w.dumps(data)
