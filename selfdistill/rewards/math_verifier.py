"""Math answer verifier: the reward of a response is whether its last `\\boxed{}` equals the gold.

Cheap cases are decided in the calling process (identical answers after light
normalisation, two plain integers): the default CPU task never leaves it. Answers no checker
should spend time on (power towers, huge limits, deep nesting, overlong or look-alike text:
`guard.py`) are refused there too, with status `refused`. Everything else goes to `math_check.check` (math-verify, then a safe sympy fallback) in a `DeadlinePool`,
so a pathological answer costs at most `timeout_s` and never stalls the run. Usable from
any thread and inside Ray actors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from selfdistill.rewards.deadline_pool import DeadlinePool
from selfdistill.rewards.guard import AnswerLimits, refusal

STATUSES = ("correct", "wrong", "unparsable", "refused", "timeout", "error")

_BOX_TOKEN = re.compile(r"\\(?:boxed|fbox)\s*\{|\\[{}]|[{}]")
_SPACING = re.compile(r"\\[,;:! ]|\\quad|\\qquad|\s+|\\left|\\right")
_THOUSANDS_COMMA = re.compile(r"(?<=\d)(?:,|\{,\})(?=\d{3}(?!\d))")
_UNIT_TAIL = re.compile(r"(?<=.)\\(?:text|mathrm|mbox)\{[^{}]*\}$")
_DEGREES = re.compile(r"\^\{?\\circ\}?$")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class VerifyResult:
    """Reward of one response and why, one of `STATUSES`.

    correct (1.0): equals the gold. wrong (0.0): a parsed answer that differs. unparsable
    (0.0): no `\\boxed{}` answer, or nothing in it parses. refused (0.0): the answer breaks one
    of the `AnswerLimits` (`reason` says which) and no checker saw it. timeout (0.0): checking it took
    longer than `timeout_s`. error (0.0): the gold answer is empty or the check crashed.
    """

    reward: float
    status: str
    reason: str = ""


def extract_boxed(text: str) -> str | None:
    """Contents of the last balanced `\\boxed{...}` (or `\\fbox{...}`) in `text`, else None.

    Escaped braces `\\{ \\}` do not count. One pass over the text: linear even for
    adversarial nesting. Of nested boxes the innermost last one wins.
    """
    open_braces: list[tuple[int, bool]] = []  # (content start, opened by \boxed / \fbox)
    last: tuple[int, int] | None = None
    for match in _BOX_TOKEN.finditer(text):
        token = match.group()
        if token in ("\\{", "\\}"):
            continue
        if token.endswith("{"):
            open_braces.append((match.end(), token != "{"))
        elif open_braces:
            start, is_box = open_braces.pop()
            if is_box and (last is None or start > last[0]):
                last = (start, match.start())
    return None if last is None else text[last[0] : last[1]]


def normalize_answer(answer: str) -> str:
    """Light, meaning-preserving cleanup used only to spot identical answers cheaply."""
    answer = answer.strip().strip("$").strip()
    answer = _UNIT_TAIL.sub("", answer)
    answer = _SPACING.sub("", answer)
    answer = _THOUSANDS_COMMA.sub("", answer)
    answer = _DEGREES.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return answer.replace("\\%", "").replace("\\$", "").rstrip(".")


def quick_status(gold: str, predicted: str) -> str | None:
    """The status when the strings alone settle it ("correct" or "wrong"), else None (needs math)."""
    gold, predicted = normalize_answer(gold), normalize_answer(predicted)
    if gold == predicted and gold:
        return "correct"
    if _INTEGER.fullmatch(gold) and _INTEGER.fullmatch(predicted):
        return "correct" if _canonical_integer(gold) == _canonical_integer(predicted) else "wrong"
    return None


def _canonical_integer(digits: str) -> str:
    # Compared as strings: int() refuses more than 4300 digits and a model may emit more.
    sign = "-" if digits.startswith("-") else ""
    magnitude = digits.lstrip("+-").lstrip("0") or "0"
    return "0" if magnitude == "0" else sign + magnitude


class MathVerifier:
    """Scores responses against gold answers; see the module docstring.

    `timeout_s` bounds the time spent on one answer; `num_workers` processes verify in
    parallel and start on first need. `limits` refuses hopeless answers before any worker
    (None: every answer goes to a worker). Call `close()` (or use `with`) to stop them.
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int = 2, limits: AnswerLimits | None = AnswerLimits()):
        self.limits = limits
        # By name: sympy and math-verify load in the workers only, never in the caller.
        self._pool = DeadlinePool(
            "selfdistill.rewards.math_check.check",
            num_workers=num_workers,
            timeout_s=timeout_s,
            warm_up="selfdistill.rewards.math_check.warm_up",
        )

    def score(self, responses: list[str], golds: list[str]) -> list[VerifyResult]:
        """One `VerifyResult` per response, in order; `golds[i]` is the answer to `responses[i]`."""
        if len(responses) != len(golds):
            raise ValueError(f"score: {len(responses)} responses but {len(golds)} golds")
        statuses: list[str | None] = [None] * len(responses)
        reasons = [""] * len(responses)
        hard: list[int] = []
        hard_pairs: list[tuple[str, str]] = []
        for i, (response, gold) in enumerate(zip(responses, golds, strict=True)):
            if self.limits and len(response) > self.limits.max_response_chars:
                statuses[i], reasons[i] = "refused", f"response longer than {self.limits.max_response_chars} characters"
                continue
            predicted = extract_boxed(response)
            gold = gold_answer(gold)
            if not gold:
                statuses[i] = "error"
            elif predicted is None or not predicted.strip():
                statuses[i] = "unparsable"
            else:
                statuses[i] = quick_status(gold, predicted)
                reason = refusal(predicted, self.limits) if statuses[i] is None and self.limits else None
                if reason:
                    statuses[i], reasons[i] = "refused", reason
                elif statuses[i] is None:
                    hard.append(i)
                    hard_pairs.append((gold, predicted))
        for i, (status, value) in zip(hard, self._pool.map(hard_pairs), strict=True):
            statuses[i] = value if status == "ok" else status
        return [VerifyResult(1.0 if s == "correct" else 0.0, s, r) for s, r in zip(statuses, reasons)]

    @property
    def worker_deaths(self) -> int:
        """Worker processes that died while checking an answer (each such answer was checked again)."""
        return self._pool.deaths

    @property
    def workers_started(self) -> int:
        """Worker processes started so far (replacements included): 0 while every answer was decided here."""
        return self._pool.started

    def close(self) -> None:
        """Stop the worker processes."""
        self._pool.close()

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def gold_answer(gold: str) -> str:
    """The bare gold answer: its `\\boxed{}` contents if it has one, without `$` delimiters."""
    boxed = extract_boxed(gold)
    return (boxed if boxed is not None else gold).strip().strip("$").strip()
