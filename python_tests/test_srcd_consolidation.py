"""The analysis behind RESULTS' consolidation numbers (cram_ext.srcd.consolidation): the smoothed
attention curve and its transition step, the q histograms around it, and the power law of
P(episodic | pattern seen k times) with its bootstrap interval, checked on data whose answer is
known."""
import math

import numpy as np
import pytest

from cram_ext.srcd.consolidation import (consolidation_summary, exposure_power_law,
                                         fit_power_law, q_distributions, smooth)
from cram_ext.srcd.exposure import PatternExposure


def test_smooth_is_the_trailing_mean():
    values = np.random.default_rng(0).random(40)
    for window in (1, 3, 25, 60):
        expected = [values[max(0, i + 1 - window):i + 1].mean() for i in range(len(values))]
        np.testing.assert_allclose(smooth(values, window), expected, rtol=1e-12)


def curve(smoothed):
    return {"steps": np.arange(1, len(smoothed) + 1), "smoothed": np.asarray(smoothed, float)}


def test_transition_is_the_first_step_after_the_peak_below_the_geometric_mean():
    # rises to 0.8 at step 3, falls to 0.05: the geometric mean is 0.2
    summary = consolidation_summary(curve([0.5, 0.7, 0.8, 0.6, 0.3, 0.21, 0.19, 0.1, 0.05]))
    assert summary["peak_attention"] == 0.8 and summary["final_attention"] == 0.05
    assert summary["fall_factor"] == pytest.approx(16.0)
    assert summary["consolidation_ratio"] == pytest.approx(1 / 16)
    assert summary["transition_step"] == 7
    # 0.19 before the peak does not count
    assert consolidation_summary(curve([0.19, 0.8, 0.3, 0.05]))["transition_step"] == 4


def test_no_transition_without_a_twofold_fall_and_no_ratio_without_attention():
    assert consolidation_summary(curve([0.5, 0.8, 0.6, 0.45]))["transition_step"] is None
    empty = consolidation_summary(curve([0.0, 0.0]))
    assert empty["transition_step"] is None and math.isnan(empty["consolidation_ratio"])
    gone = consolidation_summary(curve([0.4, 0.1, 0.0]))
    assert gone["fall_factor"] == math.inf and gone["transition_step"] == 3   # mean of 0.4, 0


def test_q_distributions_sum_the_steps_before_the_transition_and_the_last_tenth():
    log = [{"q_histogram": [step] + [0] * 9} for step in range(1, 101)]
    distributions = q_distributions(log, transition_step=50)
    assert distributions["before"][0] == sum(range(41, 51))   # the 10 steps before step 51
    assert distributions["after"][0] == sum(range(91, 101))
    assert q_distributions(log, None)["before"][0] == sum(range(1, 11))


def test_power_law_fit_recovers_exact_data_and_ignores_empty_bins():
    k = 2.0 ** np.arange(8)
    probability = 0.9 * k ** -0.43
    probability[3] = 0.0                      # a bin where nothing attended: log undefined
    weight = np.ones_like(k)
    weight[5] = 0.0                           # a bin nobody reached
    a, gamma = fit_power_law(k, probability, weight)
    assert a == pytest.approx(0.9, rel=1e-12) and gamma == pytest.approx(0.43, rel=1e-12)
    assert all(math.isnan(x) for x in fit_power_law(k[:1], probability[:1], weight[:1]))


def test_power_law_of_a_simulated_training_stream_recovers_its_exponent():
    """Patterns queried in a stream, each query sent to episodic memory with probability
    0.9 k^-0.43 (the paper's fit) at its k-th sighting, counted by PatternExposure as training
    counts them: the fit recovers γ (within 0.03 on twelve seeds of the stream tried), inside a
    narrow bootstrap interval."""
    rng = np.random.default_rng(1)
    n_patterns, gamma = 400, 0.43
    exposure = PatternExposure(n_patterns, n_layers=1)
    # Zipf-like popularity, so that k spans many ⌊log2 k⌋ bins
    popularity = 1.0 / np.arange(1, n_patterns + 1)
    stream = rng.choice(n_patterns, size=60_000, p=popularity / popularity.sum())
    seen = np.zeros(n_patterns, dtype=np.int64)
    episodic = np.empty(len(stream), dtype=np.int64)
    for index, pattern in enumerate(stream):
        seen[pattern] += 1
        episodic[index] = rng.random() < 0.9 * seen[pattern] ** -gamma
    exposure.update(stream, episodic[None])
    fit = exposure_power_law(exposure.episodic[0], exposure.total, n_bootstrap=200)
    low, high = fit["gamma_ci95"]
    assert fit["gamma"] == pytest.approx(gamma, abs=0.03)
    assert gamma - 0.05 < low <= fit["gamma"] <= high < gamma + 0.05, fit["gamma_ci95"]
    assert sum(fit["count"]) == len(stream)
