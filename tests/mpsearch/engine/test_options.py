"""SearchOptions: one validated, versioned value for a search's options, stored for workers."""

from __future__ import annotations

import json

import pytest

from hw_models import LayerChoice, Precision
from mpsearch.engine.options import OPTIONS_VERSION, SearchOptions
from mpsearch.errors import InvalidConfigError
from mpsearch.scoring.evaluator import QuantSettings

P = Precision


def test_text_forms_and_a_json_round_trip():
    o = SearchOptions(task="digits", objectives="latency,metric", weight_precisions=[P.INT8, "int4", "int8"],
                      ties=[["a", "b"]], pins={"c": LayerChoice(P.INT8, P.FP32)},
                      quant=QuantSettings(weight_rounding="adaround"), latency_budget_ms=2.5)
    assert o.objectives == ("metric", "latency")  # the metric first, as the study is told
    assert o.weight_precisions == ("int8", "int4")  # repeats dropped, order kept
    assert o.ties == (("a", "b"),) and dict(o.pins) == {"c": "int8/fp32"}
    d = json.loads(json.dumps(o.to_dict()))
    assert d["version"] == OPTIONS_VERSION and d["quant"]["weight_rounding"] == "adaround"
    assert SearchOptions.from_dict(d) == o


def test_a_launch_record_written_before_the_version_still_reads():
    """The fields `mpsearch.launch` held before SearchOptions, without a version."""
    old = {"task": "digits", "target": "x86-vnni", "n_trials": 40, "sampler": "tpe", "weight_precisions": ["int4", "int8"],
           "activation_precisions": None, "ties": [], "pins": {}, "pin_first_last": True, "batch_size": 1,
           "quant": QuantSettings().to_dict(), "early_stop": False, "objectives": ["metric", "latency"],
           "latency_budget_ms": None, "size_budget_mb": 0.5, "memory_budget_mb": None, "evaluator_cache": True,
           "max_drop": "1%"}
    o = SearchOptions.from_dict(old, "study 's1'")
    assert (o.n_trials, o.size_budget_mb, o.max_drop, o.pin_first_last) == (40, 0.5, "1%", True)
    assert o.strategy == "hybrid" and o.retries == 1  # not in the old record: the defaults
    assert o.sensitivity == "fisher"


@pytest.mark.parametrize(("change", "message"), [
    ({"version": 4}, "study 's1': options version 4, this mpsearch reads version 3"),
    ({"sensitivity": "guess"}, "study 's1': sensitivity method 'guess' is not one of fisher, exact"),
    ({"colour": "red"}, "study 's1': unknown option 'colour'"),
    ({"n_trials": 0}, "study 's1': the number of trials must be a positive integer, got 0"),
    ({"strategy": "greedy"}, "study 's1': unknown strategy 'greedy'"),
    ({"latency_budget_ms": -1}, "study 's1': the latency budget must be a positive, finite number of ms, or relative"),
    ({"weight_precisions": ["int7"]}, "study 's1': weight precisions:"),
    ({"quant": {"act_range": "guess"}}, "study 's1': act_range 'guess' is not one of"),
    ({"workers": 4}, "study 's1': workers needs the ray backend"),
])
def test_stored_options_that_cannot_work_are_refused_in_one_line(change, message):
    d = {**SearchOptions(task="digits").to_dict(), **change}
    with pytest.raises(InvalidConfigError) as e:
        SearchOptions.from_dict(d, "study 's1'")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_search_writes_its_options_and_a_worker_reads_the_same(tmp_path):
    import optuna

    import mpsearch
    from mpsearch.engine.storage import LAUNCH_ATTR, make_storage

    url = f"sqlite:///{tmp_path / 's.db'}"
    r = mpsearch.search("digits", n_trials=2, strategy="optuna", weight_precisions="int4,int8", size_budget_mb=1,
                        storage=url, study_name="s", out_dir=tmp_path / "o", track=False, progress=False)
    stored = optuna.load_study(study_name="s", storage=make_storage(url)).user_attrs[LAUNCH_ATTR]
    assert stored == r.settings["options"]
    o = SearchOptions.from_dict(stored)
    assert (o.task, o.n_trials, o.strategy, o.weight_precisions, o.size_budget_mb) == (
        "digits", 2, "optuna", ("int4", "int8"), 1)
