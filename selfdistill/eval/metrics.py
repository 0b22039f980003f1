"""Benchmark metrics over k sampled responses per problem: pass@k, Avg@k, maj@k, macro averages.

Inputs are per problem: the correctness of each of its samples (bool or 0/1 reward), in
the order they were drawn, and for maj@k the answer each sample extracted.

- pass@k: the unbiased estimator of Chen et al. 2021 (Codex paper): with n samples of
  which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), the chance that k of the n drawn
  without replacement hold at least one correct one. Computed as the product
  1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms a large binomial. Mean over problems.
- Avg@k: mean correctness of the k samples of a problem, then mean over problems (the
  OPSD and DASD papers' headline number; equal to pass@1 when every problem has k samples).
- maj@k: majority vote over the first k samples' normalised answers (`normalize_answer`);
  samples without an answer do not vote. Ties go to the answer that occurs first in
  sample order. The vote is correct when the first sample carrying the winning answer was
  scored correct by the verifier. A problem where no sample has an answer scores 0.
- macro average: the unweighted mean of a metric over data sets, as papers report a
  multi-benchmark mean (each benchmark counts once, whatever its size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from selfdistill.rewards.math_verifier import normalize_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `n` samples of which `c` are correct."""
    if n < 1:
        raise ValueError(f"pass@k needs at least one sample, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: correct count c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must lie in [1, n={n}] (cannot draw more samples than were taken)")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def pass_at_k_curve(correct: Sequence[Sequence[Any]], ks: Sequence[int] | None = None) -> dict[int, float]:
    """Mean pass@k over problems for each k in `ks` (default: every k from 1 to the fewest samples of a problem)."""
    counts = _counts(correct)
    n_min = min(n for n, _ in counts)
    ks = list(range(1, n_min + 1)) if ks is None else list(ks)
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def avg_at_k(correct: Sequence[Sequence[Any]]) -> float:
    """Mean over problems of each problem's mean correctness (bool or reward in [0, 1])."""
    _counts(correct)
    return sum(sum(float(x) for x in row) / len(row) for row in correct) / len(correct)


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose normalised answer wins the vote (first occurrence), None if none has an answer.

    Ties between answers with the same count go to the one that appears first.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers):
        if answer is None or not normalize_answer(answer):
            continue
        key = normalize_answer(answer)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts.values())
    return min(first[key] for key, count in counts.items() if count == best)


def maj_at_k(answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[Any]], k: int | None = None) -> float:
    """Mean over problems of whether the majority answer of the first `k` samples (default: all) is correct."""
    if len(answers) != len(correct):
        raise ValueError(f"maj@k: {len(answers)} answer rows but {len(correct)} correctness rows")
    _counts(correct)
    total = 0.0
    for row_answers, row_correct in zip(answers, correct, strict=True):
        if len(row_answers) != len(row_correct):
            raise ValueError(f"maj@k: a problem has {len(row_answers)} answers but {len(row_correct)} scores")
        if k is not None and not 1 <= k <= len(row_answers):
            raise ValueError(f"maj@k: k={k} must lie in [1, {len(row_answers)}]")
        winner = majority_vote(row_answers[:k])
        total += 0.0 if winner is None else float(row_correct[winner])
    return total / len(answers)


def macro_average(per_dataset: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Unweighted mean over data sets of every numeric metric they all report (nested dicts recurse).

    A key missing from some data set (e.g. pass@16 where one set has fewer samples) is left out.
    """
    if not per_dataset:
        raise ValueError("macro average of no data sets")
    rows = list(per_dataset.values())
    out: dict[str, Any] = {}
    for key in rows[0]:
        values = [row.get(key) for row in rows]
        if all(isinstance(v, Mapping) for v in values):
            out[key] = macro_average({str(i): v for i, v in enumerate(values)})
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values) / len(values)
    return out


def _counts(correct: Sequence[Sequence[Any]]) -> list[tuple[int, int]]:
    """(n, c) per problem; refuses no problems and problems without samples."""
    if not correct:
        raise ValueError("no problems to score")
    counts = []
    for i, row in enumerate(correct):
        if not row:
            raise ValueError(f"problem {i} has no samples")
        counts.append((len(row), sum(1 for x in row if float(x) >= 1.0)))
    return counts
