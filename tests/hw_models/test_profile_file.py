"""Profile files: every built-in profile round-trips; bad files name the file and the field."""

import pytest

from hw_models import PROFILES, Candidate, CostModel, LayerChoice, LayerSpec, Precision, get_profile
from hw_models.profile_file import ProfileFileError, dump_profile, load_profile
from hw_models.profiles import LayerTable

P = Precision


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_builtin_profiles_round_trip(name, tmp_path):
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_profile(PROFILES[name]))
    assert load_profile(path) == PROFILES[name]
    assert get_profile(str(path)) == PROFILES[name]  # a file works wherever a target name does


def _text(**changes):
    base = dump_profile(get_profile("x86-vnni"))
    for old, new in changes.values():
        assert old in base
        base = base.replace(old, new, 1)
    return base


@pytest.mark.parametrize(("change", "needle"), [
    (("mem_bw_bytes_per_s = 20000000000.0\n", ""), "field mem_bw_bytes_per_s: missing"),
    (("layer_overhead_s = 1e-06", "layer_overhead_s = -1.0"), "field layer_overhead_s: must be >= 0"),
    (("mem_bw_bytes_per_s = 20000000000.0", 'mem_bw_bytes_per_s = "fast"'), "field mem_bw_bytes_per_s: expected a number"),
    (('weight = "int8"', 'weight = "int5"'), "unknown precision 'int5'"),
    (('compute = "int8"', 'compute = "int4"'), "compute: 'int4' has no throughput"),
    (("int8 = 0.49", "int8 = 1.5"), "field efficiency.int8: must be in (0, 1]"),
    (("name = ", "nom = "), "field name: missing"),
    (("native = true", "native = true, kernel = 3"), "field rules[0].kernel: expected a kernel name"),
    (('storage = "int4"', 'storage = "int5"'), "unknown precision 'int5'"),
])
def test_bad_files_name_the_file_and_the_field(tmp_path, change, needle):
    path = tmp_path / "bad.toml"
    path.write_text(_text(c=change))
    with pytest.raises(ProfileFileError) as e:
        load_profile(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProfileFileError, match="no such profile file"):
        load_profile(tmp_path / "nope.toml")
    (tmp_path / "x.toml").write_text("name = [")
    with pytest.raises(ProfileFileError, match="not valid TOML"):
        load_profile(tmp_path / "x.toml")


def test_layer_table_mode_uses_measured_latencies(tmp_path):
    conv = LayerSpec("features.0", "conv2d", (16, 8, 3, 3), 1, 115_200, 800, 1600)
    fc = LayerSpec("fc", "linear", (10, 64), 1, 640, 64, 10)
    table = LayerTable({"features.0": {"macs": 115_200, "fp32": 3e-4, "int8": 1e-4},
                        "fc": {"macs": 640, "fp32": 2e-5}}, batch_size=1, other_s=5e-5)
    import dataclasses

    prof = dataclasses.replace(get_profile("x86-vnni"), name="measured", layer_table=table)
    path = tmp_path / "m.toml"
    path.write_text(dump_profile(prof))
    prof = load_profile(path)
    assert prof.layer_table == table
    model = CostModel([conv, fc], prof)
    assert model.measured
    i8, f32 = LayerChoice(P.INT8, P.INT8), LayerChoice(P.FP32, P.FP32)
    cost = model.price(Candidate([("features.0", i8), ("fc", f32)]))
    t = CostModel([conv, fc], get_profile("x86-vnni")).transition_s
    assert cost.latency_s == pytest.approx(1e-4 + 2e-5 + 5e-5 + t(800) + t(64))
    # another model (different MACs) or batch size: the roofline
    assert not CostModel([conv, LayerSpec("fc", "linear", (10, 32), 1, 320, 32, 10)], prof).measured
    assert not CostModel([conv, fc], prof, batch_size=4).measured


# -- physical bounds (issue 19: numbers that break the arithmetic) -----------------------------
@pytest.mark.parametrize(("old", "new", "field", "value", "allowed"), [
    ("layer_overhead_s = 1e-06", "layer_overhead_s = 1e308", "layer_overhead_s", "1e+308", "[0, 10] s"),
    ("transition_overhead_s = 3.1e-06", "transition_overhead_s = 11.0", "transition_overhead_s", "11.0", "[0, 10] s"),
    ("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 1e-300", "mem_bw_bytes_per_s", "1e-300",
     "[1e3, 1e15] B/s"),
    ("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 20.0", "mem_bw_bytes_per_s", "20.0",
     "[1e3, 1e15] B/s"),  # GB/s written as B/s
    ("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 1e308", "mem_bw_bytes_per_s", "1e+308",
     "[1e3, 1e15] B/s"),
    ("int8 = 640000000000.0", "int8 = 1e308", "peak_macs_per_s.int8", "1e+308", "[1e3, 1e18] MAC/s"),
    ("int8 = 640000000000.0", "int8 = 1e-300", "peak_macs_per_s.int8", "1e-300", "[1e3, 1e18] MAC/s"),
    ("int8 = 0.49", "int8 = 1e-300", "efficiency.int8", "1e-300", "[1e-4, 1]"),
    ("transition_bytes_per_elem = 10.0", "transition_bytes_per_elem = 1e308", "transition_bytes_per_elem",
     "1e+308", "[0, 1e4] B"),
    ("quantize_bytes_per_elem = 8.3", "quantize_bytes_per_elem = 1e5", "quantize_bytes_per_elem", "100000.0",
     "[0, 1e4] B"),
    ("energy_pj_per_byte = 160", "energy_pj_per_byte = 1e308", "energy_pj_per_byte", "1e+308", "[0, 1e6] pJ"),
    ("int8 = 0.23", "int8 = 1e308", "energy_pj_per_mac.int8", "1e+308", "[0, 1e6] pJ"),
    ("on_chip_bytes = 18874368", "on_chip_bytes = 10000000000000000000000", "on_chip_bytes",
     "10000000000000000000000", "[1, 1e18] B"),
    ("threads = 2", "threads = 10000000", "threads", "10000000", "[1, 1e6]"),
])
def test_a_figure_outside_its_physical_bounds_names_field_value_and_range(tmp_path, old, new, field, value, allowed):
    path = tmp_path / "bad.toml"
    path.write_text(_text(c=(old, new)))
    with pytest.raises(ProfileFileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"{path}: field {field}: {value} is outside the allowed range {allowed}"


def test_layer_table_figures_are_bounded_too(tmp_path):
    import dataclasses

    table = LayerTable({"fc": {"macs": 640, "fp32": 1e308}}, batch_size=1, other_s=5e-5)
    path = tmp_path / "m.toml"
    path.write_text(dump_profile(dataclasses.replace(get_profile("x86-vnni"), layer_table=table)))
    with pytest.raises(ProfileFileError, match=r"field layer_table\.layers\.fc\.fp32: 1e\+308 is outside the "
                                               r"allowed range \[0, 1e3\] s$"):
        load_profile(path)
    table = LayerTable({"fc": {"macs": 1e30, "fp32": 1e-5}}, batch_size=1, other_s=5e-5)
    path.write_text(dump_profile(dataclasses.replace(get_profile("x86-vnni"), layer_table=table)))
    with pytest.raises(ProfileFileError, match=r"field layer_table\.layers\.fc\.macs: 1e\+30 is outside"):
        load_profile(path)
    table = LayerTable({"fc": {"macs": 640, "fp32": 1e-5}}, batch_size=1, other_s=1e308)
    path.write_text(dump_profile(dataclasses.replace(get_profile("x86-vnni"), layer_table=table)))
    with pytest.raises(ProfileFileError, match=r"field layer_table\.other_s: 1e\+308 is outside"):
        load_profile(path)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_builtin_profiles_are_within_the_bounds(name):
    PROFILES[name].check_bounds()  # raises ValueError naming the figure otherwise


def test_bounds_hold_at_their_ends_and_fail_just_past_them(tmp_path):
    path = tmp_path / "edge.toml"
    path.write_text(_text(a=("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 1e15"),
                          b=("layer_overhead_s = 1e-06", "layer_overhead_s = 0.0"),
                          c=("transition_overhead_s = 3.1e-06", "transition_overhead_s = 10.0")))
    prof = load_profile(path)
    assert prof.mem_bw_bytes_per_s == 1e15 and prof.layer_overhead_s == 0.0 and prof.transition_overhead_s == 10.0
    path.write_text(_text(a=("mem_bw_bytes_per_s = 20000000000.0", "mem_bw_bytes_per_s = 1.0000001e15")))
    with pytest.raises(ProfileFileError, match=r"mem_bw_bytes_per_s: 1000000100000000\.0 is outside"):
        load_profile(path)


@pytest.mark.parametrize("change", [
    {"layer_overhead_s": float("inf")},
    {"mem_bw_bytes_per_s": float("inf")},
    {"transition_bytes_per_elem": float("nan")},
    {"energy_pj_per_byte": float("inf")},
    {"peak_macs_per_s": {"int8": float("inf"), "fp32": 1e11}},
    {"energy_pj_per_mac": {"int8": float("nan")}},
])
def test_a_profile_with_a_non_finite_figure_cannot_be_constructed(change):
    import dataclasses

    (field,) = change
    with pytest.raises(ValueError, match=f"{field}.* must be finite"):
        dataclasses.replace(get_profile("x86-vnni"), **change)


def test_the_roofline_of_a_profile_at_its_bounds_stays_finite():
    """The extreme profile the bounds allow (slowest throughput and bandwidth, largest overheads)
    prices a large layer at a large batch to a finite latency: the ILP and the hypervolume get numbers."""
    import dataclasses
    import math

    x86 = get_profile("x86-vnni")
    slow = dataclasses.replace(x86, peak_macs_per_s={"int8": 1e3, "fp32": 1e3}, efficiency={"int8": 1e-4, "fp32": 1e-4},
                               mem_bw_bytes_per_s=1e3, layer_overhead_s=10.0, transition_overhead_s=10.0,
                               transition_bytes_per_elem=1e4, quantize_bytes_per_elem=1e4,
                               dequantize_bytes_per_elem=1e4, energy_pj_per_mac={"int8": 1e6, "fp32": 1e6},
                               energy_pj_per_byte=1e6)
    slow.check_bounds()
    big = LayerSpec("big", "linear", (100_000, 100_000), 1, 10**10, 100_000, 100_000)
    cost = CostModel([big, dataclasses.replace(big, fqn="big2")], slow, batch_size=1024).price(
        Candidate([("big", LayerChoice(P.INT8, P.INT8)), ("big2", LayerChoice(P.FP32, P.FP32))]))
    # by hand: each layer 1024 x 1e10 MACs at 1e3 x 1e-4 MAC/s = 1.024e14 s (compute-bound) + 10 s overhead;
    # two conversions (fp32 input -> int8, int8 -> fp32) of 1024 x 1e5 elements: 10 s + 1.024e8 x 1e4 B / 1e3 B/s
    assert cost.latency_s == pytest.approx(2 * (1.024e14 + 10) + 2 * (10 + 1.024e8 * 1e4 / 1e3))
    assert math.isfinite(cost.energy_j)
