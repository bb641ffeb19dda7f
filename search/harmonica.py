"""``harmonica``: HarmoniCa (Huang et al., ICML 2025): a learned router trained by Step-Wise Denoising
Training (SDT) under the Image-Error-Proxy-guided objective (IEPO).

The router is the shared one (:mod:`planner.search._router`), trained by the shared trainer
(:mod:`planner.search._trainer`) over a beta grid; the model's weights are frozen.

**SDT** (:mod:`planner.search._harmonica_sdt`): each round is a full sampling run from fresh noise
with the sampler the plan targets. At every step the teacher is the frozen full model on the
*student's* current x_t, the student is the soft-gated model, one optimizer update per step, and
the next x_t comes from the student's (detached) prediction: training sees the inputs and cache
states that the earlier cached steps really produce.

**IEPO** (:mod:`planner.search._harmonica_proxy`): loss_t = lambda_t * MSE(student, teacher) /
E[teacher^2] + beta * sum_j w_j s_tj. lambda is recomputed every ``proxy_every`` optimizer updates
by gradient-free runs of the calibration inputs under the hard plan the current gates give at the
budget's threshold (``proxy=paper``, ``released`` or ``uniform``), normalised to mean 1 with a floor.

**Budget**: as ``l2c``, each kept set of gates under each cap in ``max_runs`` gets its threshold by
bisection on the latency model and the least-error hard plan wins. The caps matter: the soft
student mixes fresh and cached values at every step, so the cache it trains on never goes as stale
as a run of hard zeros. See docs/strategies/harmonica.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import AliasChoices, Field, model_validator

from planner.seeds import EVAL_SEED_BASE
from planner.io import write_atomic
from planner.search import Strategy, StrategySettings, register
from planner.search._harmonica_proxy import PROXIES, normalise, raw_proxy
from planner.search._harmonica_sdt import StepwiseDistillation
from planner.search._router import (
    THETA_ALL_REUSE,
    check_reach,
    choose_plan,
    frozen,
    decisions_from_gates,
    plan_at_theta,
    theta_for_speedup,
)
from planner.search._trainer import RouterTrainer, common_params

PROXY_FILE = "proxy.csv"
# Training noise comes from seeds in [TRAIN_SEED_MIN, EVAL_SEED_BASE): never a calibration seed
# (0..N-1 for any sensible N) nor an evaluation seed.
TRAIN_SEED_MIN = 100_000


class HarmoniCaSettings(StrategySettings):
    level: Literal["block", "sublayer"] = Field(
        "block", description="gate whole blocks (a gate of 0 reuses the residual) or attention and MLP apart (the paper)")
    proxy: Literal[PROXIES] = Field(
        "paper", description="how lambda_t is measured: paper (caching off at step t only), released (marginal, "
                             "from the last step back), uniform (lambda = 1: SDT alone)")
    betas: tuple[float, ...] = Field(
        (0.003, 0.01, 0.03, 0.1), min_length=1, validation_alias=AliasChoices("betas", "beta"),
        description="the penalty grid, smallest first (one training stage each)")
    rounds: int = Field(12, ge=1, description="rollouts per beta (each gives steps - 1 optimizer updates)")
    batch: int = Field(8, ge=1, description="samples per rollout")
    lr: float = Field(0.05, gt=0, description="AdamW learning rate of the scores")
    init: float = Field(2.0, description="initial score (2.0: gate 0.88, every module computes)")
    cost_weighted: bool = Field(True, description="weight each gate's penalty by its module's compute time (mean 1)")
    proxy_every: int = Field(100, ge=1, description="optimizer updates between lambda recomputations")
    proxy_floor: float = Field(0.1, ge=0, le=1, description="least weight of a step after normalising lambda")
    theta: float | None = Field(None, gt=0, le=1, description="a fixed threshold instead of the budget search")
    max_runs: tuple[int | None, ...] = Field(
        (None, 1, 2, 3, 4, 6), min_length=1,
        description="caps on consecutive reuses the hard plans try (null: no cap)")
    checkpoint_every: int = Field(4, ge=1, description="rounds between checkpoints")
    seed: int = Field(0, ge=0, description="seed of the rollouts' noise")
    resume: bool = Field(False, description="continue from the checkpoint beside the plan")

    @model_validator(mode="after")
    def _valid_grids(self) -> "HarmoniCaSettings":
        if any(b < 0 for b in self.betas):
            raise ValueError(f"betas must not be negative, got {list(self.betas)}")
        if any(r is not None and r < 1 for r in self.max_runs):
            raise ValueError(f"max_runs are caps of at least 1 (null: no cap), got {list(self.max_runs)}")
        return self


def round_seeds(seed: int, index: int, batch: int) -> list[int]:
    """The noise seeds of training round ``index``: fresh for every round, a function of ``(seed, index)``
    only (so a resumed training draws the same noise), inside ``[TRAIN_SEED_MIN, EVAL_SEED_BASE)``."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randint(TRAIN_SEED_MIN, EVAL_SEED_BASE, (batch,), generator=gen).tolist()


class HarmoniCaTrainer(RouterTrainer):
    """Trains one router by SDT + IEPO (see the module docstring); a unit is one rollout."""

    format = "harmonica-checkpoint/1"
    penalty = "beta"
    unit_name = "round"

    def __init__(self, context, settings: HarmoniCaSettings, budget):
        super().__init__(context, settings, settings.level, settings.betas, settings.rounds, resume=settings.resume)
        self.budget = budget
        self.iterations = 0  # optimizer updates so far
        self.lambdas = torch.ones(context.steps)
        self.proxy_at = 0  # iterations at the last lambda recomputation
        self.proxy_rows: list[dict] = []

    def training_key(self) -> dict:
        s = self.settings
        keys = ("proxy", "betas", "rounds", "batch", "lr", "init", "cost_weighted", "proxy_every", "proxy_floor", "seed")
        return {"level": self.level, "budget": self.budget.to_dict(),
                **{k: list(getattr(s, k)) if k == "betas" else getattr(s, k) for k in keys}}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"lambdas": self.lambdas}

    def state_meta(self) -> dict:
        return {"iterations": self.iterations, "proxy_at": self.proxy_at, "proxy_rows": self.proxy_rows}

    def load_state(self, tensors, meta) -> None:
        self.lambdas = tensors["lambdas"].float()
        self.iterations, self.proxy_at = int(meta["iterations"]), int(meta["proxy_at"])
        self.proxy_rows = list(meta["proxy_rows"])

    def snapshot_params(self, weight: float, done: int) -> dict:
        return {"beta": weight, "iterations": self.iterations}

    def train_unit(self, weight: float, index: int) -> dict:
        if self.settings.proxy != "uniform" and self.iterations - self.proxy_at >= self.settings.proxy_every:
            self.update_lambdas()
        parts = self.round(weight, index).summary()
        free = self.lambdas[1:]
        return {"iteration": self.iterations, "round": index + 1, **parts,
                "lambda_min": float(free.min()), "lambda_max": float(free.max())}

    # ------------------------------------------------------------------ SDT
    def round(self, beta: float, index: int, record: bool = False) -> StepwiseDistillation:
        """One SDT round (a full rollout from the fresh noise of round ``index``); returns its hooks' record."""
        from planner.executor.session import apply_gates

        ctx, s = self.ctx, self.settings
        seeds = round_seeds(s.seed, index, s.batch)
        conditions = ctx.runner.conditions(s.batch, seed=seeds[0])
        sdt = StepwiseDistillation(ctx.runner.transformer, self.router, self.optimizer, self.lambdas, beta,
                                   self.weights, self.layout.calls_per_step, record=record)
        gated = apply_gates(ctx.runner.pipe, sdt.gates, self.names, cfg_layout=self.layout)
        with frozen(ctx.runner.transformer), gated, sdt:
            ctx.runner.run(conditions, seeds, ctx.sampler, output="latent")
        sdt.check_complete(ctx.steps)
        self.iterations += ctx.steps - 1
        return sdt

    # ------------------------------------------------------------------ IEPO
    def proxy_theta(self) -> float:
        """The threshold of the hard plan lambda is measured on: the budget's (the plan training aims
        at; every free entry reuses if even that misses), or 0.5 for an error target."""
        if self.settings.theta is not None:
            return self.settings.theta
        if self.budget.speedup is None:
            return 0.5
        found = theta_for_speedup(self.ctx, self.router, self.budget.speedup)
        return found[0] if found is not None else THETA_ALL_REUSE

    def final(self, mask: torch.Tensor) -> torch.Tensor:
        """Final latents of the calibration inputs under the hard plan of a 0/1 ``mask`` (1 = compute)."""
        from planner.executor import apply_plan

        ctx = self.ctx
        plan = ctx.plan(decisions_from_gates(mask.float(), self.names, self.level, 0.5))
        with apply_plan(ctx.runner.pipe, plan):
            return ctx.runner.run(ctx.conditions, ctx.seeds, ctx.sampler, output="latent")

    def update_lambdas(self) -> None:
        """Recompute lambda (gradient-free runs from the calibration noise) and log it."""
        theta = self.proxy_theta()
        hard = self.router.hard_gates(theta)
        with torch.no_grad():
            raw = raw_proxy(self.final, hard, self.settings.proxy, full=self.ctx.reference)
        self.lambdas = normalise(raw, self.settings.proxy_floor)
        self.proxy_at = self.iterations
        for t in range(self.ctx.steps):
            self.proxy_rows.append({"iteration": self.iterations, "theta": float(theta), "step": t,
                                    "cached_fraction": float(1 - hard[t].mean()), "raw": float(raw[t]),
                                    "lambda": float(self.lambdas[t])})


@register
class HarmoniCa(Strategy):
    """HarmoniCa: a router trained by SDT under IEPO (see the module docstring)."""

    name = "harmonica"
    summary = "HarmoniCa: a router trained by step-wise denoising rollouts, weighted by an image-error proxy"
    Settings = HarmoniCaSettings

    def search(self, context, budget):
        s = self.settings
        trainer = HarmoniCaTrainer(context, s, budget)
        how = f"of a harmonica router ({s.level} level, {s.proxy} proxy)"
        check_reach(context, budget, trainer.router, s.max_runs, how)
        snapshots = trainer.train()
        common = common_params(s, s.level, trainer.progress.elapsed_s, proxy=s.proxy, betas=list(s.betas),
                               rounds_per_beta=s.rounds, batch=s.batch, proxy_every=s.proxy_every,
                               proxy_floor=s.proxy_floor, max_runs=list(s.max_runs))
        for g in snapshots:
            g.params = {**common, **g.params}
        if s.theta is not None:
            plan = plan_at_theta(context, budget, snapshots, s.theta, self.name, how)
        else:
            plan = choose_plan(context, budget, snapshots, self.name, how, max_runs=s.max_runs)
        trainer.save_beside_plan(plan, {"proxy": s.proxy, "lambda": [round(float(x), 4) for x in trainer.lambdas]})
        if context.artifacts is not None:
            import pandas as pd

            rows = pd.DataFrame(trainer.proxy_rows)
            write_atomic(Path(context.artifacts) / PROXY_FILE, lambda tmp: rows.to_csv(tmp, index=False))
        return plan
