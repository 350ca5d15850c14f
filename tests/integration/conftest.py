"""Fixtures shared by the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def module_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``$TESTBED_STATE_DIR`` set to a fresh folder for one test module (its testbeds' state
    files stay apart from any other run's), restored afterwards."""
    d = tmp_path_factory.mktemp("tbstate")
    old = os.environ.get("TESTBED_STATE_DIR")
    os.environ["TESTBED_STATE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("TESTBED_STATE_DIR", None)
    else:
        os.environ["TESTBED_STATE_DIR"] = old


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$TESTBED_STATE_DIR`` set to this test's own folder (a module may override this with
    its ``module_state_dir``)."""
    d = tmp_path / "state"
    monkeypatch.setenv("TESTBED_STATE_DIR", str(d))
    return d
