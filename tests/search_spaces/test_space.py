import optuna
import pytest

from hw_models import LayerSpec, Precision, get_profile
from search_spaces import SearchSpace, SpaceError

P = Precision
X86 = get_profile("x86-vnni")
LAYERS = [
    LayerSpec("a", "conv2d", (4, 1, 3, 3), 1, 100, 10, 10),
    LayerSpec("b", "linear", (2, 4), 1, 8, 4, 2),
]


def test_default_space_size_and_params():
    space = SearchSpace(LAYERS, X86)
    # 6 weight precisions x 2 activation precisions per layer, all runnable on x86-vnni
    assert space.size == 12 * 12
    dists = space.distributions()
    assert set(dists) == {"w:a", "a:a", "w:b", "a:b"}
    cand = space.candidate({"w:a": "int3", "a:a": "int8", "w:b": "fp32", "a:b": "fp32"})
    assert cand["a"].weight is P.INT3 and cand["b"].activation is P.FP32
    assert space.candidate(space.params(cand)) == cand


def test_restricted_precisions_and_fp32_only_activation_layers():
    space = SearchSpace(LAYERS, X86, [P.INT4, P.INT8], [P.INT8, P.FP32], fp32_activation_layers=["b"])
    assert space.size == 4 * 2
    assert "a:b" not in space.distributions()
    assert space.candidate({"w:a": "int4", "a:a": "int8", "w:b": "int8"})["b"].activation is P.FP32


def test_space_drives_optuna_ask():
    space = SearchSpace(LAYERS, X86, [P.INT4, P.INT8], [P.INT8])
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {space.candidate(study.ask(space.distributions()).params) for _ in range(30)}
    assert len(seen) == 4  # every candidate of the 2x2 space is reachable


def test_nothing_runnable_is_an_error():
    with pytest.raises(SpaceError, match="runs none"):
        SearchSpace(LAYERS, X86, [P.FP16], [P.FP16])
