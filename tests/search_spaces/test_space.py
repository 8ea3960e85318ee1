import math

import optuna
import pytest

from hw_models import Candidate, LayerChoice, LayerSpec, Precision, get_profile
from search_spaces import SearchSpace, SpaceError

P = Precision
X86 = get_profile("x86-vnni")
LAYERS = [
    LayerSpec("a", "conv2d", (4, 1, 3, 3), 1, 100, 10, 10),
    LayerSpec("b", "linear", (2, 4), 1, 8, 4, 2),
]


def test_default_space_size_and_params():
    space = SearchSpace(LAYERS, X86)
    # x86-vnni runs int2..int8 weights with int8 activations and fp32 with fp32; int2 / int3 are
    # stored as INT4 and int6 as INT8 there (the same cost as int4 / int8, less accuracy), so the
    # default space is int4/int8, int8/int8 and fp32/fp32 per layer
    assert [f"{c.weight}/{c.activation}" for c in space.layer_choices("a")] == ["int4/int8", "int8/int8", "fp32/fp32"]
    assert space.size == 3 * 3
    dists = space.distributions()
    assert set(dists) == {"p:a", "p:b"}  # not every weight with every activation: one parameter a layer
    cand = space.candidate({"p:a": "int4/int8", "p:b": "fp32/fp32"})
    assert cand["a"].weight is P.INT4 and cand["b"].activation is P.FP32
    assert space.candidate(space.params(cand)) == cand
    # asked for explicitly, the narrower grids are there
    assert SearchSpace(LAYERS, X86, [P.INT2, P.INT3, P.INT6], [P.INT8]).size == 3 * 3


def test_restricted_precisions_and_fp32_only_activation_layers():
    space = SearchSpace(LAYERS, X86, [P.INT4, P.INT8, P.FP32], [P.INT8, P.FP32], fp32_activation_layers=["b"])
    assert space.size == 3 * 1  # b: fp32/fp32 only (no integer weight runs with an fp32 input on x86-vnni)
    assert "p:b" not in space.distributions()
    assert space.candidate({"p:a": "int4/int8"})["b"] == LayerChoice(P.FP32, P.FP32)
    with pytest.raises(SpaceError, match="layer b: x86-vnni runs none"):
        SearchSpace(LAYERS, X86, [P.INT4, P.INT8], [P.INT8, P.FP32], fp32_activation_layers=["b"])


def test_space_drives_optuna_ask():
    space = SearchSpace(LAYERS, X86, [P.INT4, P.INT8], [P.INT8])
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {space.candidate(study.ask(space.distributions()).params) for _ in range(30)}
    assert len(seen) == 4  # every candidate of the 2x2 space is reachable


def test_nothing_runnable_is_an_error():
    with pytest.raises(SpaceError, match="runs none"):
        SearchSpace(LAYERS, X86, [P.FP16], [P.FP16])


def test_targets_that_do_not_run_every_pair_get_one_parameter_per_layer():
    h100 = get_profile("h100")
    space = SearchSpace(LAYERS, h100, [P.INT4, P.INT8, P.BF16], [P.INT8, P.BF16, P.FP32])
    # h100 runs int4 / int8 weights with bf16 activations (weight-only), int4 weights on int8
    # kernels, int8 x int8, bf16 x bf16; never integer weights with fp32 activations
    pairs = {f"{c.weight}/{c.activation}" for c in space.layer_choices("a")}
    assert pairs == {"int4/int8", "int4/bf16", "int8/int8", "int8/bf16", "bf16/bf16"}
    assert space.size == 5 * 5
    dists = space.distributions()
    assert set(dists) == {"p:a", "p:b"}
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=2))
    seen = set()
    for _ in range(200):
        cand = space.candidate(study.ask(dists).params)
        assert all(h100.rule(c.weight, c.activation) is not None for c in cand.values())
        assert space.candidate(space.params(cand)) == cand
        seen.add(cand)
    assert len(seen) == 25
    # the default space is every pair the target runs
    assert SearchSpace(LAYERS, h100).options[0].size == len(h100.rules)
    # on x86-vnni, less the pairs stored and run as a wider one (int2, int3, int6)
    assert len(X86.rules) == 6 and SearchSpace(LAYERS, X86).options[0].size == 3


THREE = [*LAYERS, LayerSpec("c", "linear", (2, 2), 1, 4, 2, 2)]


def test_ties_share_one_parameter_and_pins_fix_a_layer():
    space = SearchSpace(THREE, X86, [P.INT4, P.INT8], [P.INT8], ties=[["c", "a"]], pins={"b": LayerChoice(P.INT8, P.INT8)})
    assert space.ties == (("a", "c"),)  # execution order: "a" leads
    assert set(space.distributions()) == {"w:a"}
    assert space.size == 2
    assert round(space.unreduced_log10_size, 6) == round(3 * math.log10(2), 6)  # 2 x 2 x 2 before reduction
    cand = space.candidate({"w:a": "int4"})
    assert cand["c"] == cand["a"] == LayerChoice(P.INT4, P.INT8) and cand["b"].weight is P.INT8
    assert space.candidate(space.params(cand)) == cand
    assert sorted(c["a"].weight.bits for c in space.enumerate()) == [4, 8]
    d = space.describe()
    assert d["ties"] == [["a", "c"]] and d["pins"] == {"b": "int8/int8"}


def test_enumerate_yields_every_candidate_once():
    space = SearchSpace(THREE, X86, [P.INT2, P.INT4, P.INT8], [P.INT8])
    cands = list(space.enumerate())
    assert len(cands) == len(set(cands)) == space.size == 27


def test_bad_ties_and_pins_are_errors():
    with pytest.raises(SpaceError, match="no such quantizable layer"):
        SearchSpace(THREE, X86, ties=[["a", "zz"]])
    with pytest.raises(SpaceError, match="cannot pin layer b to int2/int8"):
        SearchSpace(THREE, X86, [P.INT4], [P.INT8], pins={"b": LayerChoice(P.INT2, P.INT8)})
    # b keeps fp32 activations; a does not offer them: no common pair
    with pytest.raises(SpaceError, match="no precision pair in common"):
        SearchSpace(THREE, X86, [P.INT8, P.FP32], [P.INT8], fp32_activation_layers=["b"], ties=[["a", "b"]])
    space = SearchSpace(THREE, X86, [P.INT4, P.INT8], [P.INT8], ties=[["a", "c"]])
    with pytest.raises(SpaceError, match="tied to a"):
        space.params(Candidate({"a": LayerChoice(P.INT4, P.INT8), "b": LayerChoice(P.INT4, P.INT8),
                                "c": LayerChoice(P.INT8, P.INT8)}))
