"""Adaptive teacher exposure: how much of the reference solution the teacher is shown.

The "partial" teacher context is the question, the first floor(alpha * m) of the m reference
steps and the final answer (`data.templates.partial_reference`). More exposure gives sharper
targets but a wider teacher-student mismatch (arXiv 2605.11458: the mismatch grows with alpha,
the best fixed alpha was 0.5). This module picks alpha for each training step by one of three
policies, named in `ExposureConfig.policy`:

- `fixed`: alpha is constant.
- `schedule`: alpha moves linearly from `schedule_start` at step 0 to `schedule_end` at step
  `schedule_steps` (default: the whole run), then stays there.
- `controller`: a learned Beta policy. A small MLP reads the training state and gives
  alpha ~ Beta(a, b), (a, b) = 1 + softplus(MLP(state)). One draw, clipped to
  [alpha_min, alpha_max], is held for `hold_steps` (H) training updates; when they are done,
  the decision is scored by the learning progress it bought and the MLP takes one REINFORCE
  step (Adam).

Controller state, 5 numbers: step / total_steps (clipped to [0, 1]), then exponential moving
averages (new = ema_decay * old + (1 - ema_decay) * value) of the alpha used, the distillation
loss (`loss_key`), the teacher-student KL under the partial context (`kl_key`) and the
student's confidence exp(-entropy), entropy being its mean token entropy in nats
(`entropy_key`): the inverse perplexity of its next-token distribution, 1 when certain, with
no vocabulary size needed. Loss and KL enter as sign(x) * log(1 + |x|), so any scale fits.

Reward of a decision held over steps k = 0..H-1 with losses l_k:

    R = sum_{k=1..H-1} gamma^(k-1) * [(l_{k-1} - l_k) + answer_weight * (g_k - g_{k-1})]

g_k is the teacher's log-prob of the reference answer when the caller passes one
(`answer_logprob`). Only differences inside the window count: the loss is measured against the
alpha-dependent teacher, so the jump from the previous decision's loss to this one's is a change
of ruler, not progress; hence H >= 2. The advantage is (R - mean) / std with exponential running
mean and variance of the rewards (decay `baseline_decay`, the current reward included, which
bounds |advantage| by sqrt(d / (1 - d)), 3 by default). Policy loss:
-advantage * log Beta(x | a, b) + entropy_coef * relu(entropy_floor - entropy(Beta(a, b))), x
being the draw before clipping; the hinge is a floor that keeps the policy exploring.

Asynchronous pipeline (`rollout.max_staleness` k > 0): the batch of step n+k+1 is made, and
its alpha asked for, before step n is observed. So alpha() may run ahead of observe(): a new
decision is drawn from the state observed so far, every decision stays open until its last
step is observed, and each observation is credited to the decision whose window holds its step.

Robustness: a metric that is missing or not finite is skipped: its moving average keeps its
last value, a signal never seen enters the state as 0, a step pair lacking a value adds no
reward term, and a decision with no term at all is not learned from. Finite metrics are
clipped to +-1e6. The paper does not publish H, gamma, the answer weight (lambda), the
learning rate or the MLP size: the defaults here are our choices.
"""

from __future__ import annotations

import base64
import io
import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

STATE_SIZE = 5
METRIC_LIMIT = 1e6  # finite metric values are clipped to +-this
DRAW_EPS = 1e-6  # Beta draws are kept in [eps, 1 - eps] so their log-density stays finite


class ExposureConfig(BaseModel):
    """How alpha, the share of reference steps in the teacher's "partial" context, is chosen."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    policy: Literal["fixed", "schedule", "controller"] = Field(
        "fixed", description="fixed: constant alpha; schedule: linear from start to end; controller: Beta policy."
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="fixed: the alpha used at every step (paper's best: 0.5).")
    schedule_start: float = Field(
        0.25, ge=0.0, le=1.0, description="schedule: alpha at step 0 (our default: little exposure for a weak student)."
    )
    schedule_end: float = Field(1.0, ge=0.0, le=1.0, description="schedule: alpha from step schedule_steps on.")
    schedule_steps: int | None = Field(
        None, ge=1, description="schedule: steps over which alpha moves from start to end (None: the whole run)."
    )
    alpha_min: float = Field(0.1, ge=0.0, le=1.0, description="Lowest alpha used (controller draws are clipped).")
    alpha_max: float = Field(1.0, ge=0.0, le=1.0, description="Highest alpha used (controller draws are clipped).")
    hold_steps: int = Field(
        4, ge=2, description="controller: H, training updates one draw is held for (>= 2: the reward is the loss "
        "decrease inside the window).",
    )
    gamma: float = Field(0.9, gt=0.0, le=1.0, description="controller: discount of later loss decreases in a window.")
    answer_weight: float = Field(
        0.1, ge=0.0, description="controller: lambda, weight in the reward of the increase of the teacher's log-prob "
        "of the reference answer (used only when observe() is given answer_logprob).",
    )
    lr: float = Field(1e-2, gt=0.0, description="controller: Adam learning rate of the MLP.")
    hidden_size: int = Field(32, ge=1, description="controller: width of the MLP's single tanh hidden layer.")
    ema_decay: float = Field(0.9, ge=0.0, lt=1.0, description="controller: decay of the state's moving averages.")
    baseline_decay: float = Field(
        0.9, gt=0.0, lt=1.0, description="controller: decay of the running reward mean and variance (advantages)."
    )
    entropy_floor: float = Field(
        -1.0, description="controller: Beta entropy (nats) below which a hinge penalty pushes back; Beta(1, 1): 0."
    )
    entropy_coef: float = Field(1.0, ge=0.0, description="controller: weight of the entropy-floor hinge.")
    loss_key: str = Field("train/loss", description="controller: metric holding the distillation loss.")
    kl_key: str = Field("train/teacher_student_kl/partial", description="controller: metric holding the mismatch.")
    entropy_key: str = Field("train/entropy", description="controller: metric of the student's mean token entropy.")
    seed: int = Field(0, description="controller: seed of the Beta draws and of the MLP initialisation.")

    @model_validator(mode="after")
    def _within_bounds(self) -> "ExposureConfig":
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        used = {"fixed": ("alpha",), "schedule": ("schedule_start", "schedule_end"), "controller": ()}[self.policy]
        for name in used:
            value = getattr(self, name)
            if not self.alpha_min <= value <= self.alpha_max:
                raise ValueError(
                    f"{name} ({value}) must lie in [alpha_min, alpha_max] = [{self.alpha_min}, {self.alpha_max}]")
        return self


@dataclass
class _Decision:
    """One controller draw and what was observed while it was held."""

    start: int
    state: list[float]
    draw: float
    alpha: float
    a: float
    b: float
    losses: list[float | None]
    answers: list[float | None]
    done: bool = False


class ExposureController:
    """Gives the alpha for each training step and, for `controller`, learns from the metrics."""

    def __init__(self, cfg: ExposureConfig, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.cfg, self.total_steps = cfg, total_steps
        if cfg.policy != "controller":
            return
        self._rng = np.random.default_rng(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._net = nn.Sequential(nn.Linear(STATE_SIZE, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, 2))
        nn.init.zeros_(self._net[2].weight)  # start at a = b = 1 + softplus(0) whatever the state
        nn.init.zeros_(self._net[2].bias)
        self._opt = torch.optim.Adam(self._net.parameters(), lr=cfg.lr)
        self._ema: dict[str, float | None] = {"alpha": None, "loss": None, "kl": None, "confidence": None}
        self._reward_stats: list[float] | None = None  # running [mean, variance] of rewards
        # Decisions in window order: the last one learned from and every later one.
        self._decisions: list[_Decision] = []

    def alpha(self, step: int) -> float:
        """The alpha for this step's teacher scoring (the same value when asked twice)."""
        cfg = self.cfg
        if cfg.policy == "fixed":
            return cfg.alpha
        if cfg.policy == "schedule":
            span = cfg.schedule_steps or self.total_steps
            frac = min(max(step, 0), span) / span
            return self._clip((1 - frac) * cfg.schedule_start + frac * cfg.schedule_end)
        d = self._covering(step)
        if d is None:
            if self._decisions and step < self._decisions[-1].start:
                raise ValueError(f"alpha(step={step}): that step's exposure decision is already learned from")
            d = self._decide(step)
            self._decisions.append(d)
        return d.alpha

    def observe(self, step: int, metrics: dict[str, float], answer_logprob: float | None = None) -> dict[str, float]:
        """Feed the step's training metrics (after the update); returns `exposure/*` diagnostics to log.

        `answer_logprob`: the teacher's log-prob of the reference answer at this step, if the
        caller measures it (controller reward term), else None.
        """
        if self.cfg.policy != "controller":
            return {"exposure/alpha": self.alpha(step)}
        d = self._covering(step)
        if d is None:
            raise ValueError(f"observe(step={step}): no exposure decision covers this step; call alpha({step}) first")
        keys = (self.cfg.loss_key, self.cfg.kl_key, self.cfg.entropy_key)
        loss, kl, entropy = (_finite(metrics.get(k)) for k in keys)
        self._update_ema("alpha", d.alpha)
        self._update_ema("loss", loss)
        self._update_ema("kl", kl)
        self._update_ema("confidence", None if entropy is None else math.exp(-max(entropy, 0.0)))
        k = step - d.start
        d.losses[k], d.answers[k] = loss, _finite(answer_logprob)
        out = {"exposure/alpha": d.alpha, "exposure/a": d.a, "exposure/b": d.b, "exposure/beta_mean": d.a / (d.a + d.b)}
        if k == self.cfg.hold_steps - 1 and not d.done:
            d.done = True
            out.update(self._learn(d))
            self._decisions = [e for e in self._decisions if not e.done or e.start >= d.start]
        return out

    def state_dict(self) -> dict:
        """Everything needed to continue exactly; plain JSON types (fits trainer_state.json)."""
        if self.cfg.policy != "controller":
            return {"policy": self.cfg.policy}
        buf = io.BytesIO()
        torch.save({"net": self._net.state_dict(), "opt": self._opt.state_dict()}, buf)
        return {
            "policy": "controller",
            "torch": base64.b64encode(buf.getvalue()).decode("ascii"),
            "rng": self._rng.bit_generator.state,
            "ema": dict(self._ema),
            "reward_stats": self._reward_stats,
            "decisions": [asdict(d) for d in self._decisions],
        }

    def load_state_dict(self, d: dict) -> None:
        if d.get("policy") != self.cfg.policy:
            raise ValueError(
                f"exposure state was saved with policy {d.get('policy')!r}, the config has {self.cfg.policy!r}")
        if self.cfg.policy != "controller":
            return
        blob = torch.load(io.BytesIO(base64.b64decode(d["torch"])), weights_only=True)
        self._net.load_state_dict(blob["net"])
        self._opt.load_state_dict(blob["opt"])
        self._rng.bit_generator.state = d["rng"]
        self._ema = dict(d["ema"])
        self._reward_stats = list(d["reward_stats"]) if d["reward_stats"] is not None else None
        if "decisions" in d:
            self._decisions = [_Decision(**e) for e in d["decisions"]]
        else:  # saved before decisions could run ahead of observations: at most one
            self._decisions = [_Decision(**d["decision"])] if d.get("decision") else []

    # ----------------------------------------------------------------------------- internals

    def _covering(self, step: int) -> _Decision | None:
        """The decision whose window [start, start + H) holds `step`, if any."""
        for d in self._decisions:
            if d.start <= step < d.start + self.cfg.hold_steps:
                return d
        return None

    def _clip(self, alpha: float) -> float:
        return min(max(alpha, self.cfg.alpha_min), self.cfg.alpha_max)

    def _state(self, step: int) -> list[float]:
        e = self._ema
        return [min(max(step / self.total_steps, 0.0), 1.0), e["alpha"] or 0.0, _squash(e["loss"]), _squash(e["kl"]),
                e["confidence"] or 0.0]

    def _beta_params(self, state: list[float]) -> torch.Tensor:
        return 1.0 + nn.functional.softplus(self._net(torch.tensor(state)))

    def _decide(self, step: int) -> _Decision:
        state = self._state(step)
        with torch.no_grad():
            a, b = self._beta_params(state).tolist()
        draw = min(max(float(self._rng.beta(a, b)), DRAW_EPS), 1.0 - DRAW_EPS)
        h = self.cfg.hold_steps
        return _Decision(step, state, draw, self._clip(draw), a, b, [None] * h, [None] * h)

    def _update_ema(self, name: str, value: float | None) -> None:
        old = self._ema[name]
        if value is not None:
            self._ema[name] = value if old is None else self.cfg.ema_decay * old + (1 - self.cfg.ema_decay) * value

    def _reward(self, d: _Decision) -> float | None:
        """Discounted learning progress inside the window; None when no step pair had data."""
        terms = []
        for k in range(1, self.cfg.hold_steps):
            parts = []
            if d.losses[k - 1] is not None and d.losses[k] is not None:
                parts.append(d.losses[k - 1] - d.losses[k])
            if d.answers[k - 1] is not None and d.answers[k] is not None:
                parts.append(self.cfg.answer_weight * (d.answers[k] - d.answers[k - 1]))
            if parts:
                terms.append(self.cfg.gamma ** (k - 1) * sum(parts))
        return sum(terms) if terms else None

    def _advantage(self, reward: float) -> float:
        """Standardise against running statistics that include this reward (|A| <= sqrt(d / (1 - d)))."""
        if self._reward_stats is None:
            self._reward_stats = [reward, 0.0]
            return 0.0
        decay = self.cfg.baseline_decay
        mean, var = self._reward_stats
        diff = reward - mean
        mean += (1 - decay) * diff
        var = decay * (var + (1 - decay) * diff * diff)
        self._reward_stats = [mean, var]
        return (reward - mean) / math.sqrt(var) if var > 0 else 0.0

    def _learn(self, d: _Decision) -> dict[str, float]:
        reward = self._reward(d)
        if reward is None:
            return {"exposure/skipped": 1.0}
        advantage = self._advantage(reward)
        a, b = self._beta_params(d.state)
        beta = torch.distributions.Beta(a, b)
        entropy = beta.entropy()
        loss = -advantage * beta.log_prob(torch.tensor(d.draw)) + self.cfg.entropy_coef * torch.relu(
            self.cfg.entropy_floor - entropy)
        self._opt.zero_grad()
        loss.backward()
        self._opt.step()
        return {"exposure/reward": reward, "exposure/advantage": advantage, "exposure/policy_loss": loss.item(),
                "exposure/beta_entropy": entropy.item()}


def _finite(value) -> float | None:
    """A usable metric value: None when missing or not finite, else clipped to +-METRIC_LIMIT."""
    if value is None or not math.isfinite(value):
        return None
    return min(max(float(value), -METRIC_LIMIT), METRIC_LIMIT)


def _squash(value: float | None) -> float:
    return 0.0 if value is None else math.copysign(math.log1p(abs(value)), value)
