"""The only shapes that cross actor boundaries.

Everything here is a plain dataclass of Python values and numpy arrays (Ray moves numpy
without copies and there are no tensor-device surprises); the learner turns them into
tensors in one place (`learner/batching.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Problem:
    """One prompt of a data set: a question, a worked reference solution and its final answer."""

    uid: str
    question: str
    reference: str
    answer: str
    source: str = ""


@dataclass
class Trajectory:
    """One sampled response to one prompt, as the rollout engine produced it."""

    problem: Problem
    group: int  # index of the prompt in the step: responses with the same group share a prompt
    prompt_ids: list[int]
    response_ids: list[int]
    sampling_logprobs: list[float]  # log-prob of each response token under the sampling policy
    finish_reason: str  # "stop" (EOS or stop string) or "length" (hit max_new_tokens)
    weight_version: int  # version of the weights that generated it
    text: str = ""
    reward: float = 0.0
    verify_status: str = ""  # "correct" | "wrong" | "unparsable" | "refused" | "timeout" | "error"


@dataclass
class ContextScores:
    """What the teacher says about every response token under one privileged context.

    Per response token t: the log-prob of the sampled token, the exact entropy of the
    teacher's distribution, and log-probs on a support of k token ids (the teacher's top-k,
    or ids the caller passed). `full_logprobs` holds whole vocabulary rows and is only
    filled when vocabulary x length is small (tests, tiny models).
    """

    token_logprobs: np.ndarray  # [T] float32
    entropy: np.ndarray  # [T] float32
    support_ids: np.ndarray  # [T, k] int64 (k may be 0)
    support_logprobs: np.ndarray  # [T, k] float32
    full_logprobs: np.ndarray | None = None  # [T, V] float32


@dataclass
class TeacherScores:
    """Scores of one response under every context the objective asked for."""

    contexts: dict[str, ContextScores]
    weight_version: int
