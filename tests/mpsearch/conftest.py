"""Shared fixtures of the mpsearch tests.

MPSEARCH_TEST_VNNI=0 runs the ONNX Runtime tests as on an x86 CPU without VNNI: the deployed
graphs get uint8 weights (`mpsearch.onnx_export.default_weight_dtype`), the path such CPUs take,
on whatever CPU runs the tests (`make test-cpus` sets it). It reaches this process only, not the
CLI subprocesses some tests start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest


def pytest_configure(config) -> None:
    if os.environ.get("MPSEARCH_TEST_VNNI") != "0":
        return
    try:
        from mpsearch import onnx_export
    except ImportError:  # no onnx extra: no ONNX Runtime test runs
        return
    if not hasattr(onnx_export, "cpu_has_vnni"):
        raise pytest.UsageError("MPSEARCH_TEST_VNNI=0: mpsearch.onnx_export.cpu_has_vnni is gone; "
                                "update tests/mpsearch/conftest.py")
    onnx_export.cpu_has_vnni = lambda: False
    if onnx_export.default_weight_dtype() != "uint8" and os.uname().machine in ("x86_64", "AMD64"):
        raise pytest.UsageError("MPSEARCH_TEST_VNNI=0 did not switch default_weight_dtype to uint8")


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port free on 127.0.0.1 right now (for servers the tests start)."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def ray_head_factory():
    """`ray_head` for test modules (conftest is not importable under --import-mode=importlib)."""
    return ray_head


@contextlib.contextmanager
def ray_head(port: int, env: dict[str, str] | None = None, cpus: int = 2, resources: dict | None = None):
    """A real Ray head (`ray start --head --block` as a subprocess, stopped by its PID), with token
    authentication, its own token file and temp dir; yields (address, the environment a driver
    needs to join it: the token's path but not RAY_AUTH_MODE, which mpsearch turns on itself)."""
    temp = tempfile.mkdtemp(prefix="mpsr", dir="/tmp")  # short: Ray's unix sockets live there
    token = Path(temp) / "token"
    token.write_text("mpsearch-test-" + os.urandom(16).hex())
    head_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    args = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
            f"--num-cpus={cpus}", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    log = Path(temp) / "head.log"
    with log.open("w") as out:
        head = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=head_env)
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            assert head.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        driver_env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
        driver_env |= {"RAY_AUTH_TOKEN_PATH": str(token), "PYTHONUNBUFFERED": "1"}
        yield f"127.0.0.1:{port}", driver_env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait(timeout=30)
        subprocess.run(["rm", "-rf", temp], check=False)


@pytest.fixture(scope="session")
def mlflow_server_factory():
    """`mlflow_server` for test modules."""
    return mlflow_server


@contextlib.contextmanager
def mlflow_server(root: Path, port: int):
    """A real `mlflow server` on 127.0.0.1:port with its own SQLite store and artifact folder under
    `root`; yields (uri, process); stopped by its process group (the server and the workers it
    started, nothing else), if still running."""
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, (root / "server.log").read_text()[-2000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


REPO = Path(__file__).resolve().parents[2]


def _check_report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_report", REPO / "tools" / "check_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def browser_path() -> str | None:
    """The Chromium (or Chrome) on this machine, None when there is none (tools/check_report.py)."""
    return _check_report_module().find_browser()


@pytest.fixture(scope="session")
def browser(browser_path) -> str:
    """The headless Chromium (or Chrome) the report checks and kaleido's PNGs use. Without one the
    test is skipped, unless MPSEARCH_REQUIRE_BROWSER=1 (.ci/run sets it after installing one)."""
    path = browser_path
    if path is None:
        if os.environ.get("MPSEARCH_REQUIRE_BROWSER") == "1":
            pytest.fail("MPSEARCH_REQUIRE_BROWSER=1 but no chromium, chromium-browser or google-chrome on PATH")
        pytest.skip("no Chromium or Chrome (apt install chromium): the browser checks and PNGs need one")
    return path
