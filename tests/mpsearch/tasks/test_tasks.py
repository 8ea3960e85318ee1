"""The task registry and loader, the `digits` task and its cache, and examples/custom_task.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from mpsearch import metrics
from mpsearch.cache import sha256_file
from mpsearch.errors import MissingDependencyError, TaskLoadError, UnknownTaskError
from mpsearch.tasks import BUILTIN_TASKS, Task, digits, list_tasks, load_task

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "custom_task.py"


# ---------------------------------------------------------------------------------------------
# digits: trained weights shipped in the package
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_task():
    return digits.build()


def _quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_digits_model_has_eight_quantizable_layers_one_depthwise(digits_task):
    task = digits_task
    layers = _quant_layers(task.model)
    assert len(layers) == 8
    assert [n for n, _ in layers] == [
        "features.0", "features.2", "features.4", "features.6", "features.8", "features.10",
        "classifier.1", "classifier.3",
    ]
    depthwise = [n for n, m in layers if isinstance(m, nn.Conv2d) and m.groups > 1
                 and m.groups == m.in_channels == m.out_channels]
    assert depthwise == ["features.4"]
    assert sum(isinstance(m, nn.ReLU) for m in task.model.modules()) == 7
    assert not task.model.training


def test_digits_batches_and_metadata(digits_task):
    task = digits_task
    assert task.name == "digits"
    assert task.metric_name == "accuracy" and task.metric_fn is metrics.accuracy
    assert task.kind == "classifier" and task.description
    assert [tuple(b.shape) for b in task.calib_batches] == [(64, 1, 8, 8)] * 4
    assert [tuple(x.shape) for x, _ in task.eval_batches] == [(120, 1, 8, 8)] * 3
    targets = torch.cat([t for _, t in task.eval_batches])
    assert targets.dtype == torch.int64 and set(targets.tolist()) == set(range(10))
    for b in task.calib_batches:
        assert float(b.min()) >= 0.0 and float(b.max()) <= 1.0


def test_digits_splits_are_the_fixed_stratified_ones(digits_task):
    task = digits_task
    x_tr, _, x_te, y_te = digits.load_data()
    assert (len(x_tr), len(x_te)) == (1437, 360)
    assert torch.equal(torch.cat([x for x, _ in task.eval_batches]), x_te)
    assert torch.equal(torch.cat([t for _, t in task.eval_batches]), y_te)
    assert torch.equal(torch.cat(task.calib_batches), x_tr[:256])
    # Calibration images come from the training split only: none of them is a test image.
    test_rows = {tuple(r.flatten().tolist()) for r in x_te}
    assert not any(tuple(r.flatten().tolist()) in test_rows for r in torch.cat(task.calib_batches))


def test_digits_fp32_accuracy_is_the_same_on_every_cpu(digits_task):
    task = digits_task
    with torch.no_grad():
        logits = torch.cat([task.model(x) for x, _ in task.eval_batches])
    labels = torch.cat([t for _, t in task.eval_batches])
    # The shipped weights classify 356 of the 360 test images correctly. Float kernels differ
    # between CPUs by a few ulps (~1e-6 of the logits' scale, 26 here); the smallest gap between
    # the top two logits (0.016) is over 100x that, so no prediction can flip on another CPU.
    top2 = logits.topk(2, dim=1).values
    assert float((top2[:, 0] - top2[:, 1]).min()) > 100 * 1e-6 * float(logits.abs().max())
    assert int((logits.argmax(1) == labels).sum()) == 356
    assert task.fp32_metric == task.evaluate(task.model) == pytest.approx(356 / 360)


def test_digits_weights_ship_in_the_package_with_their_checksum():
    path = digits.weights_path()
    assert path == ROOT / "mpsearch" / "tasks" / "data" / f"digits_cnn_v{digits.VERSION}.pt"
    assert sha256_file(path) == digits.WEIGHTS_SHA256
    assert 100_000 < path.stat().st_size < 300_000  # 55k float32 parameters, nothing else
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"mpsearch.tasks" = ["data/*.txt", "data/*.pt"]' in pyproject  # in the wheel
    assert digits.state_bytes(digits.load_model()) == path.read_bytes()


@pytest.mark.parametrize("damage", ["flipped_byte", "missing", "garbage_with_matching_checksum", "wrong_shapes"])
def test_digits_damaged_weights_are_refused_naming_the_file(damage, tmp_path):
    path = tmp_path / "digits.pt"
    sha = digits.WEIGHTS_SHA256
    if damage == "flipped_byte":
        data = bytearray(digits.weights_path().read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        match = "damaged or not the packaged ones"
    elif damage == "missing":
        match = "cannot be read"
    elif damage == "garbage_with_matching_checksum":
        path.write_bytes(b"not a torch file")
        sha, match = sha256_file(path), "do not fit the digits model"
    else:
        torch.save(nn.Linear(3, 3).state_dict(), path)
        sha, match = sha256_file(path), "do not fit the digits model"
    with pytest.raises(TaskLoadError, match=match) as e:
        digits.load_model(path, sha)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    if damage in ("flipped_byte", "missing"):
        assert "python -m mpsearch.tasks.digits --write" in str(e.value)


def test_digits_packaged_file_damaged_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    from mpsearch.cli import main

    bad = tmp_path / "digits_cnn.pt"
    bad.write_bytes(b"x")
    monkeypatch.setattr(digits, "weights_path", lambda: bad)
    rc = main(["search", "--task", "digits", "--no-mlflow", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("mpsearch: error: digits weights ")


def test_digits_training_is_deterministic_and_writes_a_loadable_file(tmp_path, capsys):
    """The regeneration command: trains, writes the file, prints its digest; training again gives
    the same bytes on the same CPU, and leaves the caller's threads and RNG alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng_before = torch.get_rng_state()
        out = tmp_path / "w.pt"
        assert digits._main(["--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert torch.get_num_threads() == 2 and torch.equal(rng_before, torch.get_rng_state())
    finally:
        torch.set_num_threads(threads)
    digest = sha256_file(out)
    assert f"sha256 {digest}" in printed and f"wrote {out}" in printed
    model = digits.load_model(out, digest)
    x_tr, y_tr, x_te, y_te = digits.load_data()
    with torch.no_grad():
        assert float((model(x_te).argmax(1) == y_te).float().mean()) >= 0.96
    assert digits.state_bytes(digits.train(x_tr, y_tr)) == out.read_bytes()


# ---------------------------------------------------------------------------------------------
# Registry and loader
# ---------------------------------------------------------------------------------------------

TINY_TASK = """
import torch
from torch import nn
from mpsearch.metrics import accuracy
from mpsearch.tasks import Task


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(6, 4)
    return Task(name="tiny", model=model, calib_batches=[x], eval_batches=[(x, torch.tensor([0, 1, 2, 0, 1, 2]))],
                metric_name="accuracy", metric_fn=accuracy)


def raises():
    raise ValueError("boom\\nsecond line")


def returns_int():
    return 42


def needs_extra():
    from mpsearch.errors import MissingDependencyError
    raise MissingDependencyError("install the extra: pip install 'mpsearch[nlp]'")


not_callable = 3
"""


@pytest.fixture
def task_module(tmp_path, monkeypatch):
    """A uniquely named importable module holding TINY_TASK's functions; returns its name."""
    name = f"user_tasks_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(TINY_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_list_tasks_names_every_builtin():
    listed = list_tasks()
    assert [n for n, _ in listed] == list(BUILTIN_TASKS)
    assert {"digits", "mobilenet_v2", "minilm"} <= {n for n, _ in listed}
    assert all(desc and "\n" not in desc for _, desc in listed)
    assert BUILTIN_TASKS["digits"][0] == "mpsearch.tasks.digits:build"
    assert BUILTIN_TASKS["mobilenet_v2"][0] == "mpsearch.tasks.mobilenet:build"
    assert BUILTIN_TASKS["minilm"][0] == "mpsearch.tasks.minilm:build"


def test_builtin_task_modules_are_imported_lazily():
    code = ("import sys, mpsearch, mpsearch.tasks; mpsearch.tasks.list_tasks(); "
            "print(sorted(m for m in ('mpsearch.tasks.digits', 'mpsearch.tasks.mobilenet', "
            "'mpsearch.tasks.minilm', 'sentence_transformers', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=300)
    assert out.stdout.strip() == "[]"


def test_load_builtin_by_name(digits_task):
    task = load_task("digits")
    assert isinstance(task, Task) and task.name == "digits"
    assert task.fp32_metric == digits_task.fp32_metric


def test_load_module_function(task_module):
    task = load_task(f"{task_module}:build")
    assert isinstance(task, Task) and task.name == "tiny"
    assert 0.0 <= task.fp32_metric <= 1.0


def test_load_file_absolute_and_relative(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "my-task.py"  # not an identifier: still loads
    path.write_text(TINY_TASK)
    assert load_task(f"{path}:build").name == "tiny"
    monkeypatch.chdir(tmp_path)
    assert load_task("sub/my-task.py:build").name == "tiny"
    monkeypatch.chdir(tmp_path / "sub")
    assert load_task("my-task.py:build").name == "tiny"


def _one_line_error(exc_type, spec: str) -> str:
    with pytest.raises(exc_type) as info:
        load_task(spec)
    assert type(info.value) is exc_type
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def test_unknown_name():
    msg = _one_line_error(UnknownTaskError, "resnet9000")
    assert "resnet9000" in msg
    for name in BUILTIN_TASKS:
        assert name in msg
    assert "module:function" in msg and "file.py:function" in msg


@pytest.mark.parametrize("spec", ["a:b:c", ":build", "pkg.mod:", "pkg.mod:not-a-name", "pkg.mod:1st",
                                  "tasks.py:", "  :build", "x.py:a.b"])
def test_malformed_reference(spec):
    msg = _one_line_error(TaskLoadError, spec)
    assert "malformed" in msg and "module:function" in msg and "file.py:function" in msg


def test_module_not_importable():
    msg = _one_line_error(TaskLoadError, "no_such_module_for_mpsearch.sub:build")
    assert "no_such_module_for_mpsearch" in msg and "no module named" in msg


def test_module_with_missing_dependency_names_the_dependency(tmp_path, monkeypatch):
    name = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import no_such_dependency_for_mpsearch\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    msg = _one_line_error(TaskLoadError, f"{name}:build")
    assert name in msg and "no_such_dependency_for_mpsearch" in msg


def test_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = _one_line_error(TaskLoadError, "nowhere/task.py:build")
    assert "not found" in msg and "nowhere/task.py" in msg


def test_file_that_fails_to_load(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def build(:\n")
    msg = _one_line_error(TaskLoadError, f"{path}:build")
    assert "SyntaxError" in msg and str(path) in msg


def test_attribute_missing(task_module, tmp_path):
    msg = _one_line_error(TaskLoadError, f"{task_module}:nothing_here")
    assert "nothing_here" in msg and task_module in msg and "no attribute" in msg
    path = tmp_path / "f.py"
    path.write_text(TINY_TASK)
    msg = _one_line_error(TaskLoadError, f"{path}:nothing_here")
    assert "nothing_here" in msg and "no attribute" in msg


def test_not_callable(task_module):
    msg = _one_line_error(TaskLoadError, f"{task_module}:not_callable")
    assert "not_callable" in msg and "int" in msg and "not a function" in msg


def test_function_raises(task_module):
    msg = _one_line_error(TaskLoadError, f"{task_module}:raises")
    assert msg == f"task function {task_module}:raises raised ValueError: boom second line"


def test_function_returns_non_task(task_module):
    msg = _one_line_error(TaskLoadError, f"{task_module}:returns_int")
    assert "returns_int" in msg and "int" in msg and "not an mpsearch Task" in msg


def test_mpsearch_errors_from_a_builtin_task_propagate_unchanged(task_module, monkeypatch):
    monkeypatch.setitem(BUILTIN_TASKS, "needs_extra", (f"{task_module}:needs_extra", "test"))
    msg = _one_line_error(MissingDependencyError, "needs_extra")
    assert msg == "install the extra: pip install 'mpsearch[nlp]'"


def test_task_validation_error_propagates_unwrapped(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text(TINY_TASK + textwrap.dedent("""
        def empty_calib():
            t = build()
            return Task(name="empty", model=t.model, calib_batches=[], eval_batches=t.eval_batches,
                        metric_name="accuracy", metric_fn=accuracy)
    """))
    msg = _one_line_error(TaskLoadError, f"{path}:empty_calib")
    assert msg == "task 'empty': the calibration set is empty"


# ---------------------------------------------------------------------------------------------
# examples/custom_task.py
# ---------------------------------------------------------------------------------------------

def test_example_custom_task_loads_by_file(monkeypatch):
    threads = torch.get_num_threads()
    task = load_task(f"{EXAMPLE}:build_task")
    assert isinstance(task, Task)
    assert task.fp32_metric > 0.9
    assert task.fp32_metric == task.evaluate(task.model)
    assert sum(isinstance(m, nn.Linear) for m in task.model.modules()) >= 3
    assert torch.get_num_threads() == threads
    monkeypatch.chdir(ROOT)
    again = load_task("examples/custom_task.py:build_task")
    assert again.fp32_metric == task.fp32_metric  # deterministic
