import json

import pytest

from hw_models import Candidate, Precision
from mpsearch.errors import InvalidConfigError
from mpsearch.results.records import SCHEMA, SearchResult, TrialRecord, best_trial, pareto_front

P = Precision
CFG = Candidate.uniform(["l1", "l2"], P.INT8, P.INT8)


def rec(n, metric, lat, state="complete", feasible=True, dup=None):
    return TrialRecord(n, state, CFG, metric, lat, 100, 1000, feasible, duplicate_of=dup)


def test_pareto_by_hand():
    trials = [
        rec(0, 0.90, 1.0),  # front
        rec(1, 0.95, 2.0),  # front
        rec(2, 0.94, 2.5),  # dominated by 1
        rec(3, 0.99, 3.0),  # front
        rec(4, 0.99, 3.0, dup=3),  # same configuration as 3: listed once
        rec(5, None, 0.5, state="infeasible", feasible=False),  # never on the front
        rec(6, None, 0.4, state="fail"),
        rec(7, 0.80, 1.0),  # dominated by 0 (same latency, lower metric)
    ]
    assert pareto_front(trials) == [0, 1, 3]
    assert best_trial(trials) == 3


def test_best_ties_break_on_latency_then_number():
    assert best_trial([rec(0, 0.9, 2.0), rec(1, 0.9, 1.0), rec(2, 0.9, 1.0)]) == 1
    assert best_trial([rec(0, None, 1.0, state="infeasible", feasible=False)]) is None


def test_result_json_round_trip(tmp_path):
    ref = {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}
    r = SearchResult("digits", "x86-vnni", ref, [rec(0, 0.9, 1.0), rec(1, 0.95, 2.0)])
    path = tmp_path / "result.json"
    r.write(path)
    d = json.loads(path.read_text())
    assert d["schema"] == SCHEMA == "mpsearch.result/1"
    assert d["pareto"] == [0, 1] and d["best"] == 1
    assert d["trials"][0]["config"] == {"l1": {"weight": "int8", "activation": "int8"},
                                        "l2": {"weight": "int8", "activation": "int8"}}
    for key in ("number", "state", "config", "metric", "latency_ms", "weight_bytes", "bops", "feasible"):
        assert key in d["trials"][0]
    back = SearchResult.read(path)
    assert back.trials[1].config == CFG and back.best == 1
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


@pytest.mark.parametrize("text, message", [
    (None, "no such file"),
    ('{"schema": ', "not a readable result.json"),
    ("[1, 2]", "schema None, expected 'mpsearch.result/1'"),
    ('{"schema": "mpsearch.result/0"}', "schema 'mpsearch.result/0'"),
    ('{"schema": "mpsearch.result/1", "target": "x86-vnni"}', "KeyError: 'task'"),
    ('{"schema": "mpsearch.result/1", "task": "t", "target": "x", "reference": {}, "trials": [7]}',
     r"trials\[0\]: expected an object, found 7"),
])
def test_an_unreadable_result_json_is_a_typed_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "result.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InvalidConfigError, match=message) as e:
        SearchResult.read(path)
    assert str(e.value).startswith(f"{path}: ")


def test_memoized_write_is_the_same_file_one_trial_a_line(tmp_path):
    ref = {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0, "fp32_weight_bytes": 400}
    trials = [rec(0, 0.9, 1.0), rec(1, 0.95, 2.0)]
    trials[1].proxies = {"kl_to_fp32": 0.25}
    r = SearchResult("digits", "x86-vnni", ref, trials)
    memo: dict = {}
    r.write(tmp_path / "a.json", memo)
    r.trials.append(rec(2, 0.99, 3.0))  # a search appends; the first two come from the memo
    r.write(tmp_path / "a.json", memo)
    r.write(tmp_path / "b.json")
    text = (tmp_path / "a.json").read_text()
    assert text == (tmp_path / "b.json").read_text() and len(memo) == 3
    lines = [json.loads(line.rstrip(",")) for line in text.splitlines() if line.startswith('  {"number"')]
    assert [t["number"] for t in lines] == [0, 1, 2] and lines[1]["proxies"] == {"kl_to_fp32": 0.25}
    assert json.loads(text)["trials"] == [t.to_dict() for t in r.trials]
    assert json.loads(text)["pareto"] == [0, 1, 2]


def test_intervals_round_trip_and_are_checked(tmp_path):
    t = rec(0, 0.9, 1.0)
    t.intervals = {"metric": [0.85, 0.94], "kl_to_fp32": [0.001, 0.003]}
    path = tmp_path / "result.json"
    SearchResult("digits", "x86-vnni", {"metric_name": "accuracy", "fp32_metric": 1.0, "fp32_latency_ms": 2.0,
                                        "fp32_weight_bytes": 400}, [t]).write(path)
    assert json.loads(path.read_text())["trials"][0]["intervals"] == {"metric": [0.85, 0.94], "kl_to_fp32": [0.001, 0.003]}
    assert SearchResult.read(path).trials[0].intervals == t.intervals
    d = json.loads(path.read_text())
    d["trials"][0]["intervals"] = {"metric": [0.85]}
    path.write_text(json.dumps(d))
    with pytest.raises(InvalidConfigError, match=r"intervals"):
        SearchResult.read(path)
