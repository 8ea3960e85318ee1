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
