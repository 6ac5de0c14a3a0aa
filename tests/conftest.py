"""Suite-wide setup: the real RIFE v4.26 weights must be there (CI has them in ../shared/weights);
their absence fails the run at once instead of skipping the tests that need them. In CI ($CI set, as
.ci/run's runner sets it) so does a missing chromium: the browser tests skip without one only on a
developer's machine (scripts/setup.sh --test installs it)."""

from __future__ import annotations

import os

import pytest

from rife_data import WEIGHTS


def pytest_configure(config):
    if not WEIGHTS.is_file():
        raise pytest.UsageError(
            f"the real RIFE v4.26 weights are missing: {WEIGHTS} (the suite reads them from ../shared/weights/"
            "rife-v4.26/flownet.pkl beside the checkout, or from $STREAMGEN_TEST_RIFE)")
    os.environ["STREAMGEN_RIFE_WEIGHTS"] = str(WEIGHTS)  # what `--rife auto` finds in CLI tests
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        from test_browser import CHROMIUM

        if CHROMIUM is None:
            raise pytest.UsageError("CI: chromium is not installed, so the browser tests would skip; install it "
                                    "(bash scripts/setup.sh --test does, or apt-get install chromium)")
