"""Soak/fuzz suite of the server (issue 11). `pytest tests` runs it in a short form (each test a few
seconds of soak, the whole suite well under a minute on 2 cores); STREAMGEN_SOAK_S=<seconds> runs
every soak phase that long instead (e.g. STREAMGEN_SOAK_S=600 for a ten-minute soak per test).
Tests here carry the ``soak`` marker: ``pytest -m soak`` runs only them, ``-m 'not soak'`` leaves them out."""

from __future__ import annotations

import os

import pytest

SOAK_S = float(os.environ.get("STREAMGEN_SOAK_S") or 3.0)


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: time-bounded soak/fuzz test of the server (STREAMGEN_SOAK_S)")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.soak)


@pytest.fixture
def soak_s() -> float:
    """Seconds each soak phase runs (STREAMGEN_SOAK_S, default 3)."""
    return SOAK_S
