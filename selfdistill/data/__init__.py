"""Prompt sources: the generated arithmetic task and data files, chosen by `data.name`."""

from __future__ import annotations

import random

from selfdistill.records import Problem


def load_split(cfg, split: str, eval_size: int) -> list[Problem]:
    """Problems of `split` ("train" or "eval") from the configured source.

    The arithmetic task generates disjoint splits itself. reasoning-gym generates
    `cfg.size + eval_size` items and holds out the last `eval_size` usable ones; a file
    source and CHAMP keep their last `eval_size` problems (after the configured shuffle) as
    the held-out split. Bad rows and rows the config leaves out are counted in one line on
    stderr, with the first bad row's place (`log_report`).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if cfg.name == "arithmetic":
        from selfdistill.data.arithmetic import generate_problems

        problems = generate_problems(cfg, split)
        return problems[:eval_size] if split == "eval" else problems
    from selfdistill.data.report import log_report

    if cfg.name == "reasoning_gym":
        from selfdistill.data.reasoning_gym import load_problems as load_reasoning_gym

        problems, report = load_reasoning_gym(cfg, cfg.size + eval_size)
        label = f"reasoning_gym:{cfg.task}"
    elif cfg.name == "champ":
        from selfdistill.data.champ import load_problems as load_champ

        problems, report = load_champ(cfg)
        label = f"champ:{cfg.version}"
    else:
        from selfdistill.data.files import load_problems

        problems, report = load_problems(cfg)
        label = cfg.path
    if split == "train":  # once per run: load_split is called for both splits
        log_report(label, report)
    if eval_size >= len(problems):
        raise ValueError(f"data: {label} has {len(problems)} usable problems, too few to hold out "
                         f"run.eval_size={eval_size}")
    train_end = len(problems) - eval_size
    return problems[train_end:] if split == "eval" else problems[:train_end]


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
