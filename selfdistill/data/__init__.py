"""Prompt sources: the generated arithmetic task and data files, chosen by `data.name`."""

from __future__ import annotations

import random

from selfdistill.records import Problem


def load_split(cfg, split: str, eval_size: int) -> list[Problem]:
    """Problems of `split` ("train" or "eval") from the configured source.

    The arithmetic task generates disjoint splits itself; a file source keeps its last
    `eval_size` rows (after the configured shuffle) as the held-out split.
    """
    if cfg.name == "arithmetic":
        from selfdistill.data.arithmetic import generate_problems

        problems = generate_problems(cfg, split)
        return problems[:eval_size] if split == "eval" else problems
    from selfdistill.data.files import load_problems

    problems, _report = load_problems(cfg)
    if eval_size >= len(problems):
        raise ValueError(f"data: {cfg.path} has {len(problems)} usable rows, too few to hold out run.eval_size={eval_size}")
    return problems[-eval_size:] if split == "eval" else problems[: len(problems) - eval_size]


class PromptSampler:
    """Epoch-wise shuffled prompts; its position (epoch, cursor) is part of every checkpoint."""

    def __init__(self, problems: list[Problem], seed: int, epoch: int = 0, cursor: int = 0):
        if not problems:
            raise ValueError("data: the training split is empty")
        self.problems, self.seed, self.epoch, self.cursor = problems, seed, epoch, cursor
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}-{self.epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Problem]:
        batch = []
        while len(batch) < n:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            batch.append(self.problems[self._order[self.cursor]])
            self.cursor += 1
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}
