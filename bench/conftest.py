"""Benchmarks share the tests' input builders (python_tests/cases.py) and per-test time limit
(python_tests/conftest.py), and write every result the moment it is measured:
`record(**fields)` appends one JSON line to BENCH_RESULTS_JSONL (default
bench/results/gpu_bench_results.jsonl), and each test's outcome is appended too, so a run that
is cut short keeps everything it measured and says which case it stopped in.
"""
import importlib.util
import json
import os
import pathlib
import sys
import time

import pytest
import torch

PYTHON_TESTS = pathlib.Path(__file__).resolve().parent.parent / "python_tests"
sys.path.insert(0, str(PYTHON_TESTS))

_spec = importlib.util.spec_from_file_location("cram_test_hooks", PYTHON_TESTS / "conftest.py")
_test_hooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_test_hooks)
pytest_runtest_call = _test_hooks.pytest_runtest_call

RESULTS_PATH = pathlib.Path(os.environ.get(
    "BENCH_RESULTS_JSONL", pathlib.Path(__file__).parent / "results" / "gpu_bench_results.jsonl"))


def append_result(entry):
    entry = dict(entry, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 torch=torch.__version__,
                 device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_PATH, "a") as f:
        f.write(json.dumps(entry) + "\n")


@pytest.fixture
def record(request):
    """record(**fields): one result line, tagged with the test that measured it."""
    return lambda **fields: append_result(dict(fields, test=request.node.nodeid))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "record" in item.fixturenames and not report.skipped and (report.when == "call" or report.failed):
        append_result(dict(kind="outcome", test=item.nodeid, when=report.when,
                           outcome=report.outcome, seconds=round(report.duration, 2),
                           error=(str(report.longrepr).splitlines() or [""])[-1][:300] if report.failed else None))
