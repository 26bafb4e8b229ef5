"""Paired statistics for comparing two arms of an embedding experiment evaluated per query.

Data model
----------
* a *run* (one model, one training seed) is scored per query: ``{dataset_name: hits}``, where ``hits`` is a 1-D
  list/array with one 0/1 hit (or a float score) per query, indexed by query id (row index). Every run holds the
  same queries in the same order, so row ``q`` of a dataset is the same query in every run.
* an *arm* is one configuration trained with several seeds: ``{seed: {dataset_name: hits}}``.
* two arms are *paired* by seed (seed ``s`` of arm a against seed ``s`` of arm b) and by query index.
* an *endpoint* is a named list of datasets, ``{"IND": [...], "OOD": [...], "OOD:Mini-X": ["Mini-X"]}``. The
  endpoint score of a run is the mean over its datasets of the per-dataset mean over queries (each dataset has
  equal weight, however many queries it has).

What is computed
----------------
The difference b − a of an endpoint is the mean over seeds of the per-seed differences of endpoint scores. Its
uncertainty has two sources: which seeds were trained (training noise) and which queries were sampled into each
benchmark (test-set noise). A hierarchical paired bootstrap resamples both: seeds are the outer unit (drawn with
replacement from the seeds common to both arms), queries the inner one (for each drawn seed and each dataset,
query indices drawn with replacement). The same query indices are used for both arms, which keeps the pairing:
query difficulty that both arms share cancels out instead of widening the interval.

On top of it: an exact sign test over the per-seed differences (does b beat a seed by seed?), Holm–Bonferroni
adjusted intervals and p-values over the endpoints (several endpoints are tested at once), and
`interpolate_log_crossing` to read off the budget an arm needs to reach a target score.

Numpy and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

Hits = Sequence[float] | np.ndarray
Run = Mapping[str, Hits]  # {dataset: per-query hits}
Arm = Mapping[Hashable, Run]  # {seed: run}
Endpoints = Mapping[str, Sequence[str]]  # {endpoint: datasets}

_CHUNK_ELEMENTS = 2_000_000  # query indices drawn at once: bounds memory (16 MB of int64) per bootstrap chunk


def endpoint_score(hits_by_dataset: Run, datasets: Sequence[str]) -> float:
    """Score of one run on one endpoint: the mean over ``datasets`` of each dataset's mean over its queries.

    ``hits_by_dataset`` maps a dataset name to its per-query hits (1-D, one value per query).
    """
    if not datasets:
        raise ValueError("an endpoint needs at least one dataset")
    return float(np.mean([np.mean(np.asarray(hits_by_dataset[name], dtype=float)) for name in datasets]))


def _common_seeds(arm_a: Arm, arm_b: Arm) -> list[Hashable]:
    """Seeds present in both arms, in a fixed order (sorted where the seeds allow it)."""
    seeds = [seed for seed in arm_a if seed in arm_b]
    if not seeds:
        raise ValueError("the two arms share no seed")
    try:
        return sorted(seeds)
    except TypeError:  # mixed seed types: keep arm a's order
        return seeds


def _paired_differences(
    arm_a: Arm, arm_b: Arm, seeds: Sequence[Hashable], datasets: Sequence[str]
) -> list[np.ndarray]:
    """Per dataset, the per-query differences b − a of every seed: one array of shape (n_seeds, n_queries).

    Raises ValueError, naming the seed and dataset, where the arms disagree on the datasets or on the number of
    queries (which would break the pairing by query index).
    """
    for seed in seeds:
        if set(arm_a[seed]) != set(arm_b[seed]):
            only = sorted(set(arm_a[seed]) ^ set(arm_b[seed]))
            raise ValueError(f"seed {seed!r}: the arms have different datasets (in one arm only: {only})")
    differences = []
    for name in datasets:
        rows = []
        for seed in seeds:
            if name not in arm_a[seed]:
                raise ValueError(f"seed {seed!r}: dataset {name!r} of an endpoint is missing from the results")
            a = np.asarray(arm_a[seed][name], dtype=float)
            b = np.asarray(arm_b[seed][name], dtype=float)
            if a.ndim != 1 or a.shape != b.shape:
                raise ValueError(
                    f"seed {seed!r}, dataset {name!r}: arm a has {a.shape} hits, arm b {b.shape}; "
                    "both need the same queries (1-D, same length)"
                )
            if rows and a.shape != rows[0].shape:
                raise ValueError(
                    f"seed {seed!r}, dataset {name!r}: {a.size} queries, but seed {seeds[0]!r} has {rows[0].size}"
                )
            if a.size == 0:
                raise ValueError(f"seed {seed!r}, dataset {name!r}: no queries")
            rows.append(b - a)
        differences.append(np.stack(rows))
    return differences


def _resampled_dataset_means(
    differences: Sequence[np.ndarray], n_seeds: int, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap means of the per-query differences: shape (resamples, n_seeds drawn, n_datasets).

    Entry [r, k, d] is, in resample r, the mean of dataset d's differences over query indices drawn with
    replacement, for the k-th drawn seed. ``differences[d]`` has shape (n_seeds, n_queries_d).

    Seeds and queries are crossed, not nested: every seed is scored on the same test queries, so one draw of query
    indices per resample and dataset serves every drawn seed (a query that favours one arm on every seed is one
    query, not one per seed, which would narrow the interval by up to the square root of the seed count).
    """
    n_datasets = len(differences)
    drawn_seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))  # outer unit: seeds, with replacement
    means = np.empty((resamples, n_seeds, n_datasets))
    largest = max(d.shape[1] for d in differences)
    chunk = max(1, _CHUNK_ELEMENTS // (n_seeds * largest))
    for start in range(0, resamples, chunk):
        seeds = drawn_seeds[start : start + chunk]
        for d, diff in enumerate(differences):
            n_queries = diff.shape[1]
            # one draw of query indices per resample and dataset, shared by its drawn seeds and by both arms (it
            # indexes their difference), offset into the flattened (seed, query) array
            queries = rng.integers(0, n_queries, size=(len(seeds), n_queries))
            flat = queries[:, None, :] + (seeds * n_queries)[:, :, None]
            means[start : start + chunk, :, d] = np.take(diff.ravel(), flat).mean(axis=-1)
    return means


def _percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Equal-tailed percentile interval of ``samples`` (1-D) at ``level``."""
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(samples, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_bootstrap(
    arm_a: Arm,
    arm_b: Arm,
    endpoints: Endpoints,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """Hierarchical paired bootstrap of the difference b − a of each endpoint.

    ``arm_a`` and ``arm_b`` are ``{seed: {dataset: hits}}``; only the seeds common to both are used. Each resample
    draws seeds with replacement, then for each dataset query indices with replacement, one draw shared by every drawn
    seed (the seeds were scored on the same queries), by both arms and by every endpoint (see
    `_resampled_dataset_means`);
    its statistic is the mean over drawn seeds of (endpoint score of b − endpoint score of a).

    Returns, per endpoint, ``{"difference": observed mean over seeds of the per-seed differences, "low", "high":
    the percentile interval at ``confidence``, "per_seed": {seed: difference}, "samples": array (resamples,) of
    the resampled differences}``. ``samples`` is for `holm_adjusted_intervals`; drop it before writing JSON.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    if not endpoints:
        raise ValueError("no endpoint to compare")
    seeds = _common_seeds(arm_a, arm_b)
    datasets = sorted({name for names in endpoints.values() for name in names})
    differences = _paired_differences(arm_a, arm_b, seeds, datasets)
    means = _resampled_dataset_means(differences, len(seeds), resamples, np.random.default_rng(seed))

    column = {name: d for d, name in enumerate(datasets)}
    results = {}
    for endpoint, names in endpoints.items():
        if not names:
            raise ValueError(f"endpoint {endpoint!r} has no dataset")
        per_seed = {s: endpoint_score(arm_b[s], names) - endpoint_score(arm_a[s], names) for s in seeds}
        # endpoint scores are linear in the hits, so the score difference is the mean of the per-dataset
        # mean differences; then average over the drawn seeds.
        samples = means[:, :, [column[name] for name in names]].mean(axis=2).mean(axis=1)
        low, high = _percentile_interval(samples, confidence)
        results[endpoint] = {
            "difference": float(np.mean(list(per_seed.values()))),
            "low": low,
            "high": high,
            "per_seed": per_seed,
            "samples": samples,
        }
    return results


def sign_test(differences: Sequence[float] | Mapping[Hashable, float]) -> dict:
    """Two-sided exact binomial sign test over per-seed differences (a sequence, or ``{seed: difference}``).

    Zero differences are dropped, as is conventional (a tie says nothing about the direction), so the test runs
    on n = positive + negative seeds: p = min(1, 2 P(X <= min(positive, negative))) with X ~ Bin(n, 1/2); p = 1
    when every difference is zero.
    """
    values = list(differences.values()) if isinstance(differences, Mapping) else list(differences)
    positive = sum(1 for v in values if v > 0)
    negative = sum(1 for v in values if v < 0)
    n = positive + negative
    tail = sum(math.comb(n, k) for k in range(min(positive, negative) + 1)) / 2**n
    return {
        "positive": positive,
        "negative": negative,
        "zero": len(values) - n,
        "p_value": min(1.0, 2.0 * tail),
    }


def bootstrap_p_value(samples: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "no difference": twice the smaller share of samples on either side of 0.

    p = min(1, 2 min(mean(samples <= 0), mean(samples >= 0))): the smallest two-sided percentile-interval level
    alpha whose interval touches 0, so it agrees with the intervals (0 is outside the 1 − alpha interval roughly
    when p < alpha). Samples equal to 0 count on both sides, so a degenerate all-zero bootstrap gives p = 1.
    """
    samples = np.asarray(samples, dtype=float)
    return float(min(1.0, 2.0 * min(np.mean(samples <= 0), np.mean(samples >= 0))))


def holm_adjusted_intervals(results: Mapping[str, Mapping], confidence: float = 0.95) -> dict[str, dict]:
    """Holm–Bonferroni over the endpoints of a `paired_bootstrap` result (each needs its ``"samples"``).

    Endpoints are ranked by their bootstrap p-value (`bootstrap_p_value`), ascending; ties keep the endpoints'
    order. With alpha = 1 − confidence and m endpoints, Holm's step-down tests the endpoint ranked i (from 0) at
    alpha / (m − i) and stops at the first that it does not reject: that endpoint and every later one get the level
    of the stop, 1 − alpha / (m − stop), so an interval excludes 0 only where Holm rejects. Each interval is the
    percentile interval at its level (never narrower than the unadjusted one); the adjusted p-value is
    max over j <= i of min(1, (m − j) p_j), monotone in rank.

    Returns per endpoint ``{"low", "high", "level", "p_value", "p_adjusted"}``.
    """
    alpha = 1.0 - confidence
    p_values = {name: bootstrap_p_value(result["samples"]) for name, result in results.items()}
    ranked = sorted(p_values, key=p_values.__getitem__)  # sorted() is stable: ties keep their order
    m = len(ranked)
    adjusted = {}
    running = 0.0
    stop = None  # the rank at which the step-down stopped rejecting
    for i, name in enumerate(ranked):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        if stop is None and p_values[name] >= alpha / (m - i):
            stop = i
        level = 1.0 - alpha / (m - (i if stop is None else stop))
        low, high = _percentile_interval(np.asarray(results[name]["samples"]), level)
        adjusted[name] = {"low": low, "high": high, "level": level, "p_value": p_values[name], "p_adjusted": running}
    return {name: adjusted[name] for name in results}  # back in the endpoints' order


def _plain(seed: Hashable) -> Hashable:
    """A seed as a JSON key: numpy integers become int, other keys are kept."""
    return int(seed) if isinstance(seed, np.integer) else seed


def compare_arms(
    arm_a: Arm,
    arm_b: Arm,
    endpoints: Endpoints,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict]:
    """Bootstrap, Holm adjustment and sign test of b − a, per endpoint, as plain Python types (JSON-ready).

    Returns per endpoint ``{"difference", "low", "high", "confidence", "holm": {"low", "high", "level",
    "p_value", "p_adjusted"}, "per_seed": {seed: difference}, "sign_test": {...}, "seeds": n, "resamples": n}``.
    """
    results = paired_bootstrap(arm_a, arm_b, endpoints, resamples=resamples, seed=seed, confidence=confidence)
    holm = holm_adjusted_intervals(results, confidence=confidence)
    report = {}
    for endpoint, result in results.items():
        per_seed = {_plain(s): float(d) for s, d in result["per_seed"].items()}
        report[endpoint] = {
            "difference": float(result["difference"]),
            "low": float(result["low"]),
            "high": float(result["high"]),
            "confidence": float(confidence),
            "holm": {key: float(value) for key, value in holm[endpoint].items()},
            "per_seed": per_seed,
            "sign_test": sign_test(per_seed),
            "seeds": len(per_seed),
            "resamples": int(resamples),
        }
    return report


def interpolate_log_crossing(budgets: Sequence[float], scores: Sequence[float], target: float) -> float | None:
    """The budget at which an arm's score curve first reaches ``target``, or None if it never does.

    ``budgets`` are increasing (e.g. numbers of training pairs, [250, 500, 2000, 8000]) and ``scores`` the arm's
    mean score at each. The curve is piecewise linear in log(budget), as budgets are spaced geometrically; the
    first segment that reaches ``target`` is interpolated there. If the first point already reaches it,
    ``budgets[0]`` is returned (nothing is extrapolated below the smallest budget, nor above the largest).
    Used for "how many pairs does arm A need to match arm B at 500": target = B's score at 500.
    """
    if len(budgets) != len(scores) or len(budgets) == 0:
        raise ValueError(f"need as many scores as budgets (at least one), got {len(budgets)} and {len(scores)}")
    if any(b <= 0 for b in budgets) or any(budgets[i + 1] <= budgets[i] for i in range(len(budgets) - 1)):
        raise ValueError(f"budgets must be positive and strictly increasing, got {list(budgets)}")
    if scores[0] >= target:
        return float(budgets[0])
    for i in range(len(budgets) - 1):
        (b0, b1), (s0, s1) = budgets[i : i + 2], scores[i : i + 2]
        if s0 < target <= s1:
            fraction = (target - s0) / (s1 - s0)
            return float(b0 * (b1 / b0) ** fraction)  # = exp(log b0 + fraction (log b1 − log b0))
    return None


def resampled_scores(arm: Arm, datasets: Sequence[str], resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Bootstrap samples (resamples,) of one arm's endpoint score (mean over drawn seeds), resampling seeds, then
    queries, as `paired_bootstrap` does. The draws depend only on ``seed`` and the arm's shape (seeds, queries per
    dataset): arms of the same shape resampled with the same ``seed`` see the same seeds and queries, i.e. are
    paired."""
    seeds = sorted(arm)
    own = {s: {name: arm[s][name] for name in datasets} for s in seeds}
    zeros = {s: {name: np.zeros(len(hits)) for name, hits in run.items()} for s, run in own.items()}
    hits = _paired_differences(zeros, own, seeds, sorted(datasets))  # b − 0: the arm's own hits
    means = _resampled_dataset_means(hits, len(seeds), resamples, np.random.default_rng(seed))
    return means.mean(axis=2).mean(axis=1)


def endpoint_intervals(
    arm: Arm, endpoints: Endpoints, resamples: int = 10_000, seed: int = 0, confidence: float = 0.95
) -> dict[str, dict]:
    """Per endpoint, one arm's mean score over seeds and its bootstrap interval: ``{"mean", "low", "high"}``."""
    report = {}
    for endpoint, names in endpoints.items():
        samples = resampled_scores(arm, names, resamples, seed)
        low, high = _percentile_interval(samples, confidence)
        mean = float(np.mean([endpoint_score(arm[s], names) for s in arm]))
        report[endpoint] = {"mean": mean, "low": low, "high": high, "seeds": len(arm)}
    return report


def crossing_interval(
    curve: Mapping[float, Arm],
    target: Arm,
    datasets: Sequence[str],
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict:
    """How much data arm A needs to match arm B: the budget at which ``curve`` (``{budget: arm}``, A at each budget)
    reaches the endpoint score of ``target`` (B at its budget), by `interpolate_log_crossing`, with a bootstrap
    interval. Every arm must hold the same seeds and queries: each resample draws the same seeds and queries for all
    of them. A resample whose curve never reaches the target counts as beyond the largest budget (`inf`), so the
    interval's bounds may be `None` ("more than the largest budget")."""
    budgets = sorted(curve)
    observed = interpolate_log_crossing(
        budgets,
        [float(np.mean([endpoint_score(curve[b][s], datasets) for s in curve[b]])) for b in budgets],
        float(np.mean([endpoint_score(target[s], datasets) for s in target])),
    )
    scores = np.stack([resampled_scores(curve[b], datasets, resamples, seed) for b in budgets], axis=1)
    goals = resampled_scores(target, datasets, resamples, seed)
    crossings = np.array(
        [interpolate_log_crossing(budgets, row, goal) or math.inf for row, goal in zip(scores, goals, strict=True)]
    )
    tail = (1.0 - confidence) / 2.0  # `inverted_cdf`: an order statistic, never an interpolation towards `inf`
    low, high = np.quantile(crossings, [tail, 1.0 - tail], method="inverted_cdf")
    finite = lambda value: None if math.isinf(value) else float(value)  # noqa: E731
    return {
        "budgets": budgets,
        "crossing": observed,
        "low": finite(low),
        "high": finite(high),
        "never_reached_share": float(np.mean(np.isinf(crossings))),
    }
