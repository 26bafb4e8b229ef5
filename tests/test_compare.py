"""Paired statistics for comparing two arms (`coma_hf.evaluation.compare`), on inputs with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coma_hf.evaluation.compare import (
    bootstrap_p_value,
    compare_arms,
    crossing_interval,
    endpoint_intervals,
    endpoint_score,
    holm_adjusted_intervals,
    interpolate_log_crossing,
    paired_bootstrap,
    sign_test,
)

ENDPOINTS = {"IND": ["alpha", "beta"], "OOD": ["gamma"]}
SIZES = {"alpha": 120, "beta": 80, "gamma": 100}
RESAMPLES = 2_000  # enough for the properties tested, and fast


def random_arm(seeds=(0, 1, 2, 3), rng_seed=0, floats=False) -> dict:
    """{seed: {dataset: hits}} with 0/1 hits (or uniform floats) drawn from a fixed generator."""
    rng = np.random.default_rng(rng_seed)
    arm = {}
    for seed in seeds:
        if floats:
            arm[seed] = {name: rng.random(size) for name, size in SIZES.items()}
        else:
            arm[seed] = {name: rng.integers(0, 2, size) for name, size in SIZES.items()}
    return arm


def test_endpoint_score_weighs_datasets_equally():
    hits = {"x": [1, 0, 1, 1], "y": [0, 1]}
    assert endpoint_score(hits, ["x", "y"]) == pytest.approx((0.75 + 0.5) / 2, abs=1e-15)
    assert endpoint_score(hits, ["x"]) == 0.75


def test_identical_arms_give_zero_difference_and_interval():
    arm = random_arm()
    results = paired_bootstrap(arm, arm, ENDPOINTS, resamples=RESAMPLES)
    holm = holm_adjusted_intervals(results)
    for name in ENDPOINTS:
        assert results[name]["difference"] == 0.0
        assert (results[name]["low"], results[name]["high"]) == (0.0, 0.0)
        assert (holm[name]["low"], holm[name]["high"]) == (0.0, 0.0)
        assert holm[name]["p_value"] == 1.0 and holm[name]["p_adjusted"] == 1.0
        assert set(results[name]["per_seed"].values()) == {0.0}


def test_constant_shift_gives_an_interval_at_the_shift():
    arm_a = random_arm(floats=True)
    arm_b = {seed: {name: hits + 0.1 for name, hits in run.items()} for seed, run in arm_a.items()}
    results = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=RESAMPLES)
    holm = holm_adjusted_intervals(results)
    for name in ENDPOINTS:
        assert results[name]["difference"] == pytest.approx(0.1, abs=1e-12)
        assert results[name]["low"] == pytest.approx(0.1, abs=1e-12)
        assert results[name]["high"] == pytest.approx(0.1, abs=1e-12)
        assert holm[name]["low"] == pytest.approx(0.1, abs=1e-12)
        assert holm[name]["high"] == pytest.approx(0.1, abs=1e-12)
        assert holm[name]["p_value"] == 0.0


def test_seeds_are_the_outer_unit():
    # each seed shifts every query by its own constant: a resample's statistic is then the mean of the drawn
    # seeds' shifts, so with two seeds it can only be 0.1, 0.2 or 0.3
    arm_a = random_arm(seeds=(7, 8), floats=True)
    shift = {7: 0.1, 8: 0.3}
    arm_b = {seed: {name: hits + shift[seed] for name, hits in run.items()} for seed, run in arm_a.items()}
    result = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=RESAMPLES)["IND"]
    assert result["difference"] == pytest.approx(0.2, abs=1e-12)
    assert result["per_seed"] == {7: pytest.approx(0.1, abs=1e-12), 8: pytest.approx(0.3, abs=1e-12)}
    distance = np.abs(result["samples"][:, None] - np.array([0.1, 0.2, 0.3])).min(axis=1)
    assert distance.max() < 1e-12
    assert result["low"] == pytest.approx(0.1, abs=1e-12) and result["high"] == pytest.approx(0.3, abs=1e-12)


def test_endpoints_share_each_resample():
    arm_a, arm_b = random_arm(rng_seed=0), random_arm(rng_seed=1)
    endpoints = {"alpha": ["alpha"], "beta": ["beta"], "both": ["alpha", "beta"]}
    results = paired_bootstrap(arm_a, arm_b, endpoints, resamples=RESAMPLES)
    mean_of_parts = (results["alpha"]["samples"] + results["beta"]["samples"]) / 2
    np.testing.assert_allclose(results["both"]["samples"], mean_of_parts, rtol=0, atol=1e-12)


def real_difference_arms() -> tuple[dict, dict]:
    """Arm b hits 1 where arm a hits 0 on a random 30% of the queries, and equals a elsewhere."""
    rng = np.random.default_rng(3)
    arm_a, arm_b = {}, {}
    for seed in range(4):
        arm_a[seed], arm_b[seed] = {}, {}
        for name, size in SIZES.items():
            a = rng.integers(0, 2, size)
            better = rng.random(size) < 0.3
            a[better] = 0
            b = a.copy()
            b[better] = 1
            arm_a[seed][name], arm_b[seed][name] = a, b
    return arm_a, arm_b


def test_real_difference_excludes_zero():
    arm_a, arm_b = real_difference_arms()
    results = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=RESAMPLES)
    holm = holm_adjusted_intervals(results)
    for name in ENDPOINTS:
        result = results[name]
        assert 0 < result["low"] <= result["difference"] <= result["high"]
        assert 0.15 < result["difference"] < 0.45
        # Holm widens (never narrows) the interval
        assert holm[name]["low"] <= result["low"] and holm[name]["high"] >= result["high"]
        assert holm[name]["level"] >= 0.95


def test_bootstrap_is_deterministic_for_a_seed():
    arm_a, arm_b = random_arm(rng_seed=0), random_arm(rng_seed=1)
    first = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=500, seed=5)
    again = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=500, seed=5)
    other = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=500, seed=6)
    for name in ENDPOINTS:
        np.testing.assert_array_equal(first[name]["samples"], again[name]["samples"])
        assert (first[name]["low"], first[name]["high"]) == (again[name]["low"], again[name]["high"])
        assert not np.array_equal(first[name]["samples"], other[name]["samples"])
        assert first[name]["difference"] == other[name]["difference"]  # the observed value does not resample


def test_mismatched_queries_name_the_dataset_and_seed():
    arm_a = random_arm()
    arm_b = random_arm(rng_seed=1)
    arm_b[2]["beta"] = arm_b[2]["beta"][:-1]
    with pytest.raises(ValueError, match=r"seed 2.*'beta'"):
        paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=10)


def test_mismatched_datasets_raise():
    arm_a = random_arm()
    arm_b = random_arm(rng_seed=1)
    del arm_b[1]["gamma"]
    with pytest.raises(ValueError, match=r"seed 1.*gamma"):
        paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=10)


def test_only_common_seeds_are_used():
    arm_a, arm_b = random_arm(seeds=(0, 1, 2)), random_arm(seeds=(1, 2, 3), rng_seed=1)
    results = paired_bootstrap(arm_a, arm_b, ENDPOINTS, resamples=10)
    assert list(results["IND"]["per_seed"]) == [1, 2]


@pytest.mark.parametrize(
    ("differences", "expected"),
    [
        ([0.1, 0.2, 0.3, 0.1, 0.2, -0.1], {"positive": 5, "negative": 1, "zero": 0, "p_value": 2 * (1 + 6) / 64}),
        ([0.1] * 6, {"positive": 6, "negative": 0, "zero": 0, "p_value": 2 / 64}),
        ([1, 1, 1, 0, 0, -1], {"positive": 3, "negative": 1, "zero": 2, "p_value": 2 * (1 + 4) / 16}),
        ([0.0, 0.0], {"positive": 0, "negative": 0, "zero": 2, "p_value": 1.0}),
        ([0.2, -0.1], {"positive": 1, "negative": 1, "zero": 0, "p_value": 1.0}),
    ],
)
def test_sign_test_matches_hand_computed_p_values(differences, expected):
    assert sign_test(differences) == expected
    assert sign_test(dict(enumerate(differences))) == expected  # {seed: difference} too


def samples_with_negative_share(negative: int, total: int = 1000) -> np.ndarray:
    """Bootstrap samples with ``negative`` of ``total`` below zero: two-sided p = 2 negative / total."""
    return np.concatenate([-np.linspace(0.01, 0.02, negative), np.linspace(0.01, 0.5, total - negative)])


def test_holm_levels_and_adjusted_p_values():
    results = {
        "larger_p": {"samples": samples_with_negative_share(150)},  # p = 0.3
        "smaller_p": {"samples": samples_with_negative_share(10)},  # p = 0.02
    }
    assert bootstrap_p_value(results["larger_p"]["samples"]) == pytest.approx(0.3)
    holm = holm_adjusted_intervals(results, confidence=0.95)
    assert list(holm) == ["larger_p", "smaller_p"]  # the endpoints' order, not the ranking
    assert holm["smaller_p"]["level"] == pytest.approx(1 - 0.05 / 2)
    assert holm["larger_p"]["level"] == pytest.approx(1 - 0.05)
    assert holm["smaller_p"]["p_adjusted"] == pytest.approx(2 * 0.02)
    assert holm["larger_p"]["p_adjusted"] == pytest.approx(0.3)
    for name, result in results.items():
        low, high = np.quantile(result["samples"], [(1 - holm[name]["level"]) / 2, (1 + holm[name]["level"]) / 2])
        assert (holm[name]["low"], holm[name]["high"]) == (pytest.approx(low), pytest.approx(high))


def test_holm_adjusted_p_values_are_monotone():
    results = {
        "first": {"samples": samples_with_negative_share(10)},  # p = 0.02 -> 2 * 0.02 = 0.04
        "second": {"samples": samples_with_negative_share(15)},  # p = 0.03 -> 1 * 0.03, raised to 0.04
    }
    holm = holm_adjusted_intervals(results)
    assert holm["first"]["p_adjusted"] == pytest.approx(0.04)
    assert holm["second"]["p_adjusted"] == pytest.approx(0.04)
    assert holm["second"]["p_adjusted"] >= holm["first"]["p_adjusted"]


def plain_types_only(value) -> bool:
    """True where ``value`` holds only dict, list, str, int, float, bool or None (np.float64 is a float subclass)."""
    if isinstance(value, dict):
        return all(plain_types_only(k) and plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_types_only(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


def test_compare_arms_is_json_ready():
    arm_a, arm_b = real_difference_arms()
    arm_a = {np.int64(seed): run for seed, run in arm_a.items()}  # numpy seeds become plain ints
    arm_b = {np.int64(seed): run for seed, run in arm_b.items()}
    report = compare_arms(arm_a, arm_b, ENDPOINTS, resamples=500)
    assert plain_types_only(report)
    json.dumps(report)
    for entry in report.values():
        assert "samples" not in entry
        assert entry["low"] <= entry["difference"] <= entry["high"]
        assert entry["sign_test"] == {"positive": 4, "negative": 0, "zero": 0, "p_value": 2 / 16}
        assert all(type(seed) is int and type(value) is float for seed, value in entry["per_seed"].items())
        assert set(entry["holm"]) == {"low", "high", "level", "p_value", "p_adjusted"}
        assert entry["seeds"] == 4 and entry["resamples"] == 500


def test_interpolate_log_crossing():
    assert interpolate_log_crossing([250, 1000], [0.4, 0.6], 0.5) == pytest.approx(500, rel=1e-12)
    budgets, scores = [250, 500, 2000, 8000], [0.3, 0.4, 0.5, 0.6]
    assert interpolate_log_crossing(budgets, scores, 0.45) == pytest.approx(1000, rel=1e-12)
    assert interpolate_log_crossing(budgets, scores, 0.5) == pytest.approx(2000, rel=1e-12)
    assert interpolate_log_crossing(budgets, scores, 0.2) == 250  # already there at the first budget
    assert interpolate_log_crossing(budgets, scores, 0.7) is None  # never reached
    assert interpolate_log_crossing([250, 500, 2000], [0.4, 0.3, 0.6], 0.45) == pytest.approx(
        500 * 4 ** (0.15 / 0.3), rel=1e-12
    )  # a dip: the first segment that reaches the target
    with pytest.raises(ValueError):
        interpolate_log_crossing([500, 250], [0.4, 0.6], 0.5)


def test_queries_shared_by_every_seed_are_resampled_once_not_once_per_seed():
    """Seeds and queries are crossed: a per-query advantage that repeats on every seed is one query's worth of
    evidence, so six identical seeds give the interval of one seed, not one √6 narrower."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, size=1000).astype(float)
    b = a.copy()
    b[:100], b[100:150] = 1.0, 0.0  # better on a fixed 10 % of queries, worse on 5 %
    widths = {}
    for seeds in (1, 6):
        arm_a = {seed: {"d": a} for seed in range(seeds)}
        arm_b = {seed: {"d": b} for seed in range(seeds)}
        result = paired_bootstrap(arm_a, arm_b, {"E": ["d"]}, resamples=4000, seed=1)["E"]
        widths[seeds] = result["high"] - result["low"]
    assert widths[6] == pytest.approx(widths[1], rel=0.1)


def test_holm_stops_at_the_first_endpoint_it_does_not_reject():
    """Two endpoints at p ≈ 0.03 and 0.04 (alpha 0.05): the first is tested at 0.025 and not rejected, so the
    step-down stops; the second gets the first's level (0.975), not 0.95, and its interval keeps 0."""
    rng = np.random.default_rng(0)

    def samples_with_p(p: float) -> np.ndarray:  # a share p / 2 of the samples at or below 0
        below = int(round(p / 2 * 10_000))
        return np.concatenate([-rng.random(below), 0.01 + rng.random(10_000 - below)])

    results = {"X": {"samples": samples_with_p(0.03)}, "Y": {"samples": samples_with_p(0.04)}}
    holm = holm_adjusted_intervals(results, confidence=0.95)
    assert holm["X"]["level"] == pytest.approx(0.975) and holm["Y"]["level"] == pytest.approx(0.975)
    assert holm["X"]["low"] <= 0 and holm["Y"]["low"] <= 0
    assert holm["X"]["p_adjusted"] == pytest.approx(0.06) and holm["Y"]["p_adjusted"] == pytest.approx(0.06)
    results["X"]["samples"] = samples_with_p(0.01)  # now rejected at 0.025: Y is tested at 0.05 and rejected
    holm = holm_adjusted_intervals(results, confidence=0.95)
    assert holm["Y"]["level"] == pytest.approx(0.95) and holm["Y"]["low"] > 0 and holm["X"]["low"] > 0


def test_one_arms_interval_and_the_crossing_of_a_curve():
    """`endpoint_intervals` holds the arm's mean inside its interval; `crossing_interval` finds the budget where a
    curve that rises by 10 points per doubling reaches the target, inside its interval, and marks a target out of
    reach as never reached."""
    rng = np.random.default_rng(0)

    def arm(p: float) -> dict:
        return {seed: {"d": (rng.random(2000) < p).astype(float)} for seed in range(3)}

    single = endpoint_intervals(arm(0.5), {"E": ["d"]}, resamples=1000)["E"]
    assert single["low"] < single["mean"] < single["high"] and single["seeds"] == 3
    curve = {250: arm(0.3), 500: arm(0.4), 1000: arm(0.5), 2000: arm(0.6)}
    crossing = crossing_interval(curve, arm(0.5), ["d"], resamples=1000)
    assert crossing["low"] < 1000 * 1.2 and crossing["high"] > 1000 / 1.2 and 700 < crossing["crossing"] < 1400
    assert crossing["never_reached_share"] == 0.0
    out_of_reach = crossing_interval(curve, arm(0.9), ["d"], resamples=200)
    assert out_of_reach["crossing"] is None and out_of_reach["never_reached_share"] == 1.0
    assert out_of_reach["low"] is None and out_of_reach["high"] is None
