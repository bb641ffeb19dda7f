"""``l2c``: Learning-to-Cache (Ma et al., NeurIPS 2024), a router trained through the executor's soft gates.

The router (:mod:`planner.search._router`) is a score table ``[steps, gated modules]``; gate =
sigmoid(score), scores clamped to [-5, 5], step 0 always computes, one gate for both CFG branches.
The model's weights are frozen; only the scores learn, through the shared trainer
(:mod:`planner.search._trainer`: the lambda grid, checkpoints, resume).

Training: the calibration inputs run once at full compute and every transformer call is kept
(:func:`planner.search._router.record_calls`): its inputs hold the x_t of the full trajectory, its
output is the teacher. A *window* is a cache-filling step run in full followed by one or more
steps where the soft-gated model (every gated module returns ``s * fresh + (1 - s) * cached``
through the executor) is compared with the teacher on the same x_t. Loss = MSE(student, teacher) /
E[teacher^2] + lambda * sum over the gated modules of w_j * s_j (w_j: the module's compute time,
mean 1, with ``cost_weighted``). Beyond the paper: windows of 1..``max_distance`` gated steps keep
the cache in the autograd graph (``mode=rollout``), tiled over all steps every iteration
(``sampling=tile``), and gates may cover whole blocks (``level=block``: a gate of 0 is residual
reuse). The budget is met as :func:`planner.search._router.choose_plan` says: every kept set of
gates, under every cap on consecutive reuses up to ``max_distance``, gets its threshold by
bisection on the latency model, and the least-error hard plan wins. See docs/strategies/l2c.md.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import AliasChoices, Field, model_validator

from planner.cfg import CfgLayout, cfg_halves, guided
from planner.search import Strategy, StrategySettings, register
from planner.search._router import (
    StepCalls,
    check_reach,
    choose_plan,
    every_other_step,
    frozen,
    gated_modules,
    plan_at_theta,
    record_calls,
)
from planner.search._trainer import RouterTrainer, common_params


class L2CSettings(StrategySettings):
    level: Literal["block", "sublayer"] = Field(
        "block", description="gate whole blocks (a gate of 0 reuses the residual) or attention and MLP apart (the paper)")
    mode: Literal["rollout", "paper"] = Field(
        "rollout", description="rollout: windows of 1..max_distance gated steps; paper: refresh every other step")
    max_distance: int = Field(6, ge=1, description="rollout: the longest window after the cache-filling step (and reuse run)")
    sampling: Literal["tile", "random"] = Field(
        "tile", description="tile: windows covering all steps per iteration; random: one window per iteration (the paper)")
    loss: Literal["raw", "guided"] = Field(
        "raw", description="MSE of the model output (the paper) or of the CFG-guided prediction")
    lambdas: tuple[float, ...] = Field(
        (0.0003, 0.001, 0.003), min_length=1, validation_alias=AliasChoices("lambdas", "lambda"),
        description="the penalty grid, smallest first (one training stage each)")
    iterations: int = Field(30, ge=1, description="iterations per lambda; each covers every step (sampling=tile)")
    lr: float = Field(0.05, gt=0, description="AdamW learning rate of the scores")
    init: float = Field(2.0, description="initial score (2.0: gate 0.88, every module computes)")
    cost_weighted: bool = Field(True, description="weight each gate's penalty by its module's compute time (mean 1)")
    theta: float | None = Field(None, gt=0, le=1, description="a fixed threshold instead of the budget search")
    checkpoint_every: int = Field(10, ge=1, description="iterations between checkpoints")
    log_every: int = Field(1, ge=1, description="iterations between rows of the training curve")
    seed: int = Field(0, ge=0, description="seed of the window sampling")
    resume: bool = Field(False, description="continue from the checkpoint beside the plan")

    @model_validator(mode="after")
    def _non_negative_lambdas(self) -> "L2CSettings":
        if any(lam < 0 for lam in self.lambdas):
            raise ValueError(f"lambdas must not be negative, got {list(self.lambdas)}")
        return self


class L2CTrainer(RouterTrainer):
    """Trains one router on the full-compute trajectory, window by window (see the module docstring)."""

    format = "l2c-checkpoint/1"
    penalty = "lambda"
    unit_name = "iteration"

    def __init__(self, context, settings: L2CSettings):
        n_gated = len(gated_modules(context.modules, settings.level))
        fixed = every_other_step(context.steps, n_gated) if settings.mode == "paper" else None
        # a reuse never lasts longer than the windows the router was trained on
        super().__init__(context, settings, settings.level, settings.lambdas, settings.iterations, fixed=fixed,
                         max_run=settings.max_distance, resume=settings.resume)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.calls: StepCalls | None = None
        self.scale = 1.0

    def training_key(self) -> dict:
        s = self.settings
        keys = ("mode", "sampling", "loss", "max_distance", "lambdas", "iterations", "lr", "init", "cost_weighted", "seed")
        return {"level": self.level, **{k: list(v) if isinstance(v, tuple) else v for k, v in
                                        ((k, getattr(s, k)) for k in keys)}}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"rng": self.generator.get_state()}

    def load_state(self, tensors, meta) -> None:
        self.generator.set_state(tensors["rng"])

    def prepare(self) -> None:
        ctx = self.ctx
        self.calls = record_calls(ctx.runner, ctx.conditions, ctx.seeds, ctx.sampler, self.layout.calls_per_step)
        scale = float(torch.stack([self._view(per).float().pow(2).mean() for per in self.calls.outputs]).mean())
        self.scale = scale if scale > 0 else 1.0

    def window(self) -> tuple[int, int]:
        """``(fill step, last gated step)`` of one random window (see the module docstring)."""
        steps, g = self.ctx.steps, self.generator
        if self.settings.mode == "paper":
            odd = torch.randint(0, steps // 2, (1,), generator=g).item()
            t = 2 * odd + 1
            return t - 1, t
        t0 = int(torch.randint(0, steps - 1, (1,), generator=g).item())
        longest = min(self.settings.max_distance, steps - 1 - t0)
        d = int(torch.randint(1, longest + 1, (1,), generator=g).item())
        return t0, t0 + d

    def windows(self) -> list[tuple[int, int]]:
        """This iteration's windows: one random window (``sampling=random``, the paper's one pair per
        iteration), or windows of random length 1..max_distance tiling all steps (``sampling=tile``;
        paper mode: every (even, odd) pair), so that every gate gets its gradient every iteration."""
        if self.settings.sampling == "random":
            return [self.window()]
        steps, out, t0 = self.ctx.steps, [], 0
        while t0 < steps - 1:
            if self.settings.mode == "paper":
                d = 1
            else:
                longest = min(self.settings.max_distance, steps - 1 - t0)
                d = int(torch.randint(1, longest + 1, (1,), generator=self.generator).item())
            out.append((t0, t0 + d))
            t0 += d + 1
        return out

    def train_unit(self, weight: float, index: int) -> dict:
        """One optimizer step on this iteration's windows; the loss parts when this iteration is logged."""
        from planner.executor.session import apply_gates

        windows = self.windows()
        transformer = self.ctx.runner.transformer
        gates = self.router.gates()
        fills = torch.zeros(self.ctx.steps, 1, dtype=torch.bool)
        gated: list[int] = []
        for t0, t1 in windows:
            fills[t0] = True
            gated.extend(range(t0 + 1, t1 + 1))
        mixed = torch.where(fills, torch.ones_like(gates), gates)  # a fill step computes everything
        mse = torch.zeros(())
        with frozen(transformer), apply_gates(self.ctx.runner.pipe, mixed, self.names, cfg_layout=self.layout,
                                              detach_cache=False) as session:
            for t0, t1 in windows:
                with torch.no_grad(), session.at_step(t0):
                    self.calls.replay(transformer, t0)  # refreshes every cache entry
                for t in range(t0 + 1, t1 + 1):
                    with session.at_step(t):
                        outs = self.calls.replay(transformer, t)
                    mse = mse + torch.nn.functional.mse_loss(self._view(outs), self._view(self.calls.teacher(t)))
        mse = mse / len(gated) / self.scale
        penalty = (gates[gated] * self.weights).sum(dim=1).mean()
        loss = mse + weight * penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.router.clamp_()
        logged = (index + 1) % self.settings.log_every == 0 or self.progress.unit + 1 == self.units
        return {"iteration": index + 1, "loss": loss.item(), "mse": mse.item(), "penalty": penalty.item()} if logged else {}

    def _view(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """What the loss compares: the guided prediction ``u + g (c - u)`` the sampler uses (``loss=guided``
        with CFG on), or the raw outputs of every call."""
        if self.settings.loss == "raw" or self.layout is CfgLayout.NONE:
            return torch.cat(outs)
        if self.layout is CfgLayout.SEPARATE:
            cond, uncond = outs  # the executor's rule: cond's call comes first
        else:
            cond, uncond = cfg_halves(outs[0], self.layout)
        return guided(cond, uncond, self.ctx.sampler.guidance)


@register
class L2C(Strategy):
    """Learning-to-Cache: a router trained through the executor's soft gates (see the module docstring)."""

    name = "l2c"
    summary = "Learning-to-Cache: a router (steps x modules) trained through soft gates to match full compute"
    Settings = L2CSettings

    def search(self, context, budget):
        s = self.settings
        trainer = L2CTrainer(context, s)
        how = f"of an l2c router ({s.level} level, {s.mode} mode)"
        # every cap up to the trained window length: a cached value is never staler than trained
        runs = [None] if s.mode == "paper" else range(1, s.max_distance + 1)
        check_reach(context, budget, trainer.router, [None] if s.mode == "paper" else [s.max_distance], how)
        snapshots = trainer.train()
        common = common_params(s, s.level, trainer.progress.elapsed_s, mode=s.mode, iterations_per_lambda=s.iterations,
                               lambdas=list(s.lambdas), max_distance=s.max_distance if s.mode == "rollout" else 1)
        for g in snapshots:
            g.params = {**common, **g.params}
        if s.theta is not None:
            plan = plan_at_theta(context, budget, snapshots, s.theta, self.name, how)
        else:
            plan = choose_plan(context, budget, snapshots, self.name, how, max_runs=runs)
        trainer.save_beside_plan(plan)
        return plan
