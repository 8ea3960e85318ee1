from hw_models import Candidate, LayerChoice, LayerSpec, Precision

P = Precision


def test_candidate_is_hashable_and_round_trips():
    a = Candidate([("x", LayerChoice(P.INT4, P.INT8)), ("y", LayerChoice(P.FP32, P.FP32))])
    b = Candidate.from_dict(a.to_dict())
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert list(a) == ["x", "y"]
    assert a.to_dict() == {"x": {"weight": "int4", "activation": "int8"}, "y": {"weight": "fp32", "activation": "fp32"}}
    c = Candidate([("x", LayerChoice(P.INT8, P.INT8)), ("y", LayerChoice(P.FP32, P.FP32))])
    assert a != c


def test_layerspec_round_trip():
    spec = LayerSpec("f.0", "conv2d", (8, 1, 3, 3), 8, 100, 10, 20)
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert spec.weight_elems == 72


def test_precision_parse():
    assert P.parse(" INT4 ") is P.INT4
    assert P.INT3.bits == 3 and P.FP8_E4M3.bits == 8 and P.FP32.is_float
    try:
        P.parse("int5")
    except ValueError as e:
        assert "int5" in str(e) and "int4" in str(e)
    else:
        raise AssertionError("int5 parsed")
