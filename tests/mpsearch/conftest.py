"""Shared fixtures of the mpsearch tests.

MPSEARCH_TEST_VNNI=0 runs the ONNX Runtime tests as on an x86 CPU without VNNI: the deployed
graphs get uint8 weights (`mpsearch.onnx_export.default_weight_dtype`), the path such CPUs take,
on whatever CPU runs the tests (`make test-cpus` sets it). It reaches this process only, not the
CLI subprocesses some tests start.
"""

from __future__ import annotations

import os
import socket

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
