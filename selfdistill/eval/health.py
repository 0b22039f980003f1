"""Reasoning-health metrics of a set of responses: entropy, length, truncation, repetition, reflection.

Accuracy says whether a policy got better; these say how it reasons, and catch the usual
failure modes of RL and self-distillation (entropy collapse, runaway length, loops, lost
or inflated self-checking). Definitions, every one a mean over the responses given:

- `entropy`: mean per-token entropy (nats) over all response tokens pooled, when exact
  per-token entropies are given (e.g. from the teacher or learner).
- `surprisal`: mean -log p of the sampled tokens over all response tokens pooled, from the
  engine's sampling log-probs. Sampled at temperature T > 0 with processed log-probs its
  expectation is the entropy of the sampling distribution, so it is the entropy estimate
  available from rollouts alone. Reported whenever log-probs are given.
- `length`: mean response length in tokens.
- `truncation_rate`: share of responses cut by the length limit (finish reason "length").
- `repetition_rate`: per response, the share of its word n-grams (n = `ngram`, default 4,
  words = whitespace-separated, lower-cased) that repeat an n-gram seen earlier in the same
  response; 0 for a response with fewer than n words; then the mean over responses. Words,
  not tokens, so runs with different tokenizers compare. 0 = no repeated phrase; a
  response stuck in a loop tends to 1.
- `reflection_rate`: share of responses that contain at least one reflection marker;
  `reflections_per_response`: mean number of markers per response. A marker matches
  case-insensitively on word boundaries, any whitespace between its words
  ("Wait," and "let  me   check" count; "await" does not).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MARKERS: tuple[str, ...] = (
    "wait",
    "hmm",
    "let me check",
    "let me verify",
    "let me re-check",
    "let me recheck",
    "let me double-check",
    "double-check",
    "double check",
    "on second thought",
    "let me reconsider",
    "i made a mistake",
)


class HealthConfig(BaseModel):
    """How the reasoning-health metrics are computed (see `eval/health.py`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    markers: tuple[str, ...] = Field(
        DEFAULT_MARKERS,
        description="Reflection markers, matched case-insensitively on word boundaries (words may be separated by "
        "any whitespace).",
    )
    ngram: int = Field(4, ge=1, description="Word n-gram size of the repetition rate.")


def mean_token_value(per_token: Sequence[Sequence[float]]) -> float:
    """Mean over all tokens of all responses pooled (NaN when there are no tokens)."""
    total = sum(len(row) for row in per_token)
    return sum(sum(row) for row in per_token) / total if total else math.nan


def mean_entropy(entropies: Sequence[Sequence[float]]) -> float:
    """Mean per-token entropy over all response tokens pooled."""
    return mean_token_value(entropies)


def mean_surprisal(logprobs: Sequence[Sequence[float]]) -> float:
    """Mean -log p of the sampled tokens over all response tokens pooled (an entropy estimate)."""
    return -mean_token_value(logprobs)


def truncation_rate(finish_reasons: Sequence[str]) -> float:
    """Share of responses whose finish reason is "length"."""
    return sum(r == "length" for r in finish_reasons) / len(finish_reasons)


def words(text: str) -> list[str]:
    """Whitespace-separated words, lower-cased (the unit of the repetition rate)."""
    return text.lower().split()


def repeated_ngram_share(items: Sequence, n: int = 4) -> float:
    """Share of the n-grams of `items` that equal an n-gram occurring earlier (0 when there are none)."""
    grams = [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


def repetition_rate(texts: Sequence[str], n: int = 4) -> float:
    """Mean over responses of `repeated_ngram_share` of their words."""
    return sum(repeated_ngram_share(words(t), n) for t in texts) / len(texts)


@lru_cache(maxsize=16)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    if not markers:
        return re.compile(r"(?!x)x")  # matches nothing
    # longest first, so "let me double-check" is one match, not also "double-check"
    alternatives = [r"\s+".join(map(re.escape, m.split())) for m in sorted(set(markers), key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def count_reflections(text: str, markers: Sequence[str] = DEFAULT_MARKERS) -> int:
    """Number of non-overlapping reflection markers in `text`."""
    return len(_marker_pattern(tuple(markers)).findall(text))


def health_metrics(
    texts: Sequence[str],
    lengths: Sequence[int],
    finish_reasons: Sequence[str],
    logprobs: Sequence[Sequence[float]] | None = None,
    entropies: Sequence[Sequence[float]] | None = None,
    cfg: HealthConfig = HealthConfig(),
) -> dict[str, float]:
    """Every health metric of the responses (see the module docstring); entropy keys only when given."""
    if not texts:
        raise ValueError("health metrics of no responses")
    if not len(texts) == len(lengths) == len(finish_reasons):
        raise ValueError(f"health: {len(texts)} texts, {len(lengths)} lengths, {len(finish_reasons)} finish reasons")
    counts = [count_reflections(t, cfg.markers) for t in texts]
    out = {
        "length": sum(lengths) / len(lengths),
        "truncation_rate": truncation_rate(finish_reasons),
        "repetition_rate": repetition_rate(texts, cfg.ngram),
        "reflection_rate": sum(c > 0 for c in counts) / len(counts),
        "reflections_per_response": sum(counts) / len(counts),
    }
    if logprobs is not None:
        out["surprisal"] = mean_surprisal(logprobs)
    if entropies is not None:
        out["entropy"] = mean_entropy(entropies)
    return out
