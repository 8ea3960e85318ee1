"""`mpsearch verify`: a search's front measured as deployed graphs, written beside the predictions;
bad input refused in one line; on a Ray cluster, measured on the node carrying the target."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

import mpsearch
from mpsearch.deploy.verify import VERIFY_SCHEMA, cpu_info, measured_front, verify
from mpsearch.errors import InvalidConfigError

CLI = [sys.executable, "-m", "mpsearch.cli"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "s"
    mpsearch.search("digits", n_trials=8, seed=0, strategy="optuna", track=False, progress=False, out_dir=out)
    return out


def test_measured_front_keeps_the_non_dominated_points():
    # (metric, latency): 2 dominates 3 (better metric, faster); 1 and 2 trade off
    pts = {1: (0.99, 2.0), 2: (0.97, 1.0), 3: (0.96, 1.5), 4: (0.99, 2.5)}
    assert measured_front(pts) == [2, 1]


def test_cpu_info_names_the_features_int8_kernels_depend_on():
    info = cpu_info()
    assert info["host"] and info["cores"] >= 1
    assert set(info["features"]) <= {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                                     "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve"}


def test_verify_writes_measured_beside_predicted(searched):
    v = verify(searched, top=2, threads=1, rounds=2, progress=False)
    data = json.loads((searched / "result.json").read_text())
    assert data["verification"] == json.loads(json.dumps(v))
    assert v["schema"] == VERIFY_SCHEMA and v["target"] == "x86-vnni"
    assert v["where"]["threads"] == 1 and v["where"]["batch_size"] == 1 and "this machine" in v["where"]["placement"]
    refs = v["references"]
    assert refs["fp32"]["int8_kernels"] == 0 and refs["int8"]["int8_kernels"] == 8  # every digits layer
    assert refs["fp32"]["measured_speedup"] == 1.0
    front = [t for t in data["trials"] if t["number"] in data["pareto"]]
    assert 1 <= len(v["trials"]) <= 3  # the 2 most accurate front trials, and best when not among them
    assert str(data["best"]) in v["trials"]
    for n, t in v["trials"].items():
        rec = next(r for r in data["trials"] if r["number"] == int(n))
        assert t["predicted_latency_ms"] == rec["latency_ms"] and t["predicted_metric"] == rec["metric"]
        assert t["latency_ms"] > 0 and t["measured_speedup"] == pytest.approx(refs["fp32"]["latency_ms"] / t["latency_ms"])
        n_int8 = sum(c["weight"].startswith("int") and c["activation"] == "int8" for c in rec["config"].values())
        assert t["int8_kernels"] == n_int8  # the deployed graph runs what was asked
        assert t["sim_agreement"] >= 0.99  # ONNX Runtime agrees with the simulation
        assert abs(t["metric"] - t["sim_metric"]) <= 0.01
        assert t["front"] == (int(n) in {f["number"] for f in front})
    assert set(v["measured_front"]) <= {int(n) for n in v["trials"]}
    report = (searched / "report.html").read_text()
    assert "Verified on hardware" in report and v["where"]["host"] in report


def test_verify_refuses_other_models_targets_and_bad_options(searched, tmp_path):
    data = json.loads((searched / "result.json").read_text())

    def variant(**changes) -> str:
        d = json.loads(json.dumps(data))
        for key, value in changes.items():
            section, _, field = key.partition("__")
            if field:
                d[section][field] = value
            else:
                d[section] = value
        out = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "result.json").write_text(json.dumps(d))
        return str(out)

    with pytest.raises(InvalidConfigError, match="h100 is a gpu"):
        verify(variant(target="h100", settings__target_ref="h100"), progress=False)
    with pytest.raises(InvalidConfigError, match="another model or data"):
        verify(variant(settings__evaluator_key="0" * 24), threads=1, rounds=1, progress=False)
    renamed = json.loads(json.dumps(data["trials"]))
    for t in renamed:
        t["config"] = {f"x.{k}": v for k, v in t["config"].items()}
    with pytest.raises(InvalidConfigError, match="another model"):
        verify(variant(trials=renamed), threads=1, rounds=1, progress=False)
    with pytest.raises(InvalidConfigError, match="--top"):
        verify(searched, top=-1)
    # the CLI: one line, exit status 2
    p = subprocess.run([*CLI, "verify", variant(target="h100", settings__target_ref="h100")], capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 2 and "gpu" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("resources", [{"x86-vnni": 1}, None], ids=["target-node", "no-target-node"])
def test_verify_on_ray_measures_on_the_node_carrying_the_target(searched, tmp_path, free_port, ray_head_factory,
                                                                  resources):
    pytest.importorskip("ray")
    out = tmp_path / "s"
    subprocess.run(["cp", "-r", str(searched), str(out)], check=True)
    with ray_head_factory(free_port(), resources=resources) as (address, env):
        p = subprocess.run([*CLI, "verify", str(out), "--top", "1", "--threads", "1", "--rounds", "1",
                            "--backend", "ray", "--ray-address", address, "--no-progress"],
                           capture_output=True, text=True, timeout=600, env=env, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    where = json.loads((out / "result.json").read_text())["verification"]["where"]
    assert where["backend"] == "ray"
    if resources:
        assert where["placement"].startswith("Ray node") and "'x86-vnni'" in where["placement"]
    else:
        assert "no node of the Ray cluster" in where["placement"] and "x86-vnni" in where["placement"]
    assert "measured on" in p.stdout
