"""`--fail-root-skips`: a test marked `root` that skips fails instead.

Where root tests can run (CI runs the suite as root, see tests/run.sh), a skip means something
is missing that the run was meant to test: a tool, a kernel feature, a library. Reported as a
failure with the skip's reason, it cannot pass quietly.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fail-root-skips",
        action="store_true",
        default=False,
        help="fail every test marked root that skips (for runs as root, such as CI)",
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if (
        report.skipped
        and item.get_closest_marker("root") is not None
        and item.config.getoption("fail_root_skips")
        and not hasattr(report, "wasxfail")
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"a root test skipped in a run that must run them all: {reason}"
