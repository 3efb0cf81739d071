"""Shared test fixtures.

Random inputs use a fresh seed per test unless CRAM_TEST_SEED is set; the seed is part of the
test's report (and of assertion messages that use it), so a failure can be reproduced with
`CRAM_TEST_SEED=<seed> pytest ...`.
"""
import os
import random

import pytest
import torch


@pytest.fixture
def seed(request):
    value = int(os.environ.get("CRAM_TEST_SEED", random.SystemRandom().randrange(2**31)))
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    return value


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seeds = [value for name, value in item.user_properties if name == "seed"]
    if report.failed and seeds:
        report.sections.append(("reproduce", f"CRAM_TEST_SEED={seeds[0]}"))
