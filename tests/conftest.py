import os
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds (runs in CI all the same)")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Under CI=true every outside comparison must run: a skip there (a package of tests/requirements.txt
# or the browser missing) is a broken install, so it fails. Only tests that need a GPU may skip.
ALLOWED_IN_CI = ("cuda", "gpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(word in reason.lower() for word in ALLOWED_IN_CI):
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true ({reason}): CI installs tests/requirements.txt and chromium "
                           f"(.ci/run), so this comparison must run there")
