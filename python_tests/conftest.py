"""Shared test fixtures and hooks.

Random inputs use a fresh seed per test unless CRAM_TEST_SEED is set; the seed is part of the
test's report (and of assertion messages that use it), so a failure can be reproduced with
`CRAM_TEST_SEED=<seed> pytest ...`.

CRAM_TEST_TIMEOUT_S=<seconds> gives every test a time limit (bench/device_check.sh sets it; the
device machine may lack pytest-timeout): past it the test fails with TestTimeout and the run goes
on; a test stuck in native code, which never hands control back to Python, gets every thread's
traceback dumped and the process ended 30 s later.
"""
import faulthandler
import os
import random
import signal

import pytest
import torch


class TestTimeout(Exception):
    __test__ = False  # not a test class, whatever its name


@pytest.fixture
def seed(request):
    value = int(os.environ.get("CRAM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("CRAM_TEST_TIMEOUT_S", "0"))
    if limit <= 0:
        yield
        return

    def expire(signum, frame):
        raise TestTimeout(f"{item.nodeid} ran past {limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    faulthandler.dump_traceback_later(limit + 30, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [value for name, value in item.user_properties if name == "seed"]
    if report.failed and seeds:
        report.sections.append(("reproduce", f"CRAM_TEST_SEED={seeds[0]}"))
