"""``l2c``: Learning-to-Cache (Ma et al., NeurIPS 2024), a router trained through the executor's soft gates.

The router (:mod:`search._router`) is a score table ``[steps, gated modules]``; gate = sigmoid(score),
scores clamped to [-5, 5], step 0 always computes, one gate for both CFG branches (as the paper).
The model's weights are frozen (``requires_grad`` off while training); only the scores learn.

Training, as the paper: the calibration inputs of the search context are run once at full compute
and every transformer call is kept (:func:`search._router.record_calls`): its inputs hold the x_t
of the full trajectories, its output is the teacher. A *window* is a cache-filling step run in full
followed by one or more steps where the soft-gated model (every gated module returns
``s * fresh + (1 - s) * cached`` through ``apply_gates``; the executor's one implementation) is
compared with the teacher on the same x_t. Loss = MSE(student, teacher) / E[teacher^2] + lambda *
sum over the gated modules of w_j * s_j (mean over the window's gated steps; w_j = the module's
compute time, mean 1, with ``cost_weighted``, so that lambda trades error against time), AdamW
(no weight decay), scores clamped after every step. Batched CFG runs the null label / empty prompt
in half of every call, so the unconditional branch is trained on every iteration (what label
dropout is for in the paper, which trains on ImageNet batches).

Beyond the paper:

* ``mode=rollout`` (default): windows of 1..``max_distance`` gated steps after the filling step,
  with the cache kept in the autograd graph (``detach_cache=False``): a reused value persists
  several steps and the gates learn what a stale cache costs. Hard plans then cap runs of reuse
  at ``max_run`` <= ``max_distance`` (never staler than trained), which is what makes speedups
  past 2x reachable. ``mode=paper``: windows are the pairs (even, odd) and even steps are fixed to
  compute, the paper's refresh-every-other-step (at most 1.22x predicted for sub-layers and 1.64x
  for blocks on digits-dit).
* ``sampling=tile`` (default): each iteration tiles all steps with windows (random lengths), so
  every gate gets its gradient every iteration; ``sampling=random`` is the paper's one random
  window per iteration. With one window per iteration a gate row gets a gradient in a few % of
  the iterations and Adam keeps moving it after each visit, so the gates drift with how often each
  step happened to be drawn. Measured (digits-dit, 50 steps, blocks, best calibration error over
  lambdas and run caps): 990 random windows in 186 s gave 0.0154 / 0.0478 / 0.136 at 1.3x / 2x /
  3x, 90 tiled iterations in 153 s 0.0140 / 0.0475 / 0.123: alike, a little better at 3x.
  Without a cap on runs of reuse in the hard plan, plans were far worse (random windows of 1..6:
  2x 0.27, 3x 1.75).
* ``level=block`` (default): gates on whole blocks, a gate of 0 becomes residual reuse ``D`` (the
  executor's gated block mixes with ``x_now + cached residual``). ``level=sublayer`` is the paper's
  attention and MLP apart (gate 0 -> ``R``); on digits-dit sub-layer reuse keeps each block's norms
  and modulation (38 % of the time on CPU) and cannot pass 1.71x, and at 1.3x its best calibration
  error was 0.046 against 0.014 - 0.016 for blocks.
* ``loss=raw`` (default, the paper: the model output) or ``loss=guided`` (the CFG-combined
  prediction the sampler uses): measured alike (1.3x 0.014 vs 0.016, 2x 0.0475 both, 3x 0.123 vs
  0.127), so the paper's stays.

Budget (lambda, theta, max_run): the speed of a hard plan is set by theta (and the run cap), not by
lambda; lambda shapes the ranking of the gates. So the router is trained on a small lambda grid,
smallest first, each stage warm-started from the previous one (one optimizer throughout), and the
gates after each stage are kept. For each kept set and each run cap 1..``max_distance``, theta is
found by bisection on the latency model (the least reuse that meets ``--budget``); each of those
hard plans is run on the calibration inputs (``context.evaluate``) and the least-error one wins
(:func:`search._router.choose_plan`); with ``--max-error`` the fastest one within the target. A grid
rather than adapting lambda during training: a plan's error is only known after a full sampling
run, and a warm-started grid costs no extra training and leaves several candidates to compare on
the true metric (on digits-dit, 50 steps, the three lambdas' best plans erred 0.0140 - 0.0215 at
1.3x, 0.0475 - 0.0483 at 2x and 0.123 - 0.140 at 3x: no single lambda was best everywhere).

Checkpoints (in ``context.artifacts``, the folder beside the plan, per level): the scores, AdamW's
state, the stage, the iteration, the random generator's state, the kept gates and the curve, every
``checkpoint_every`` iterations and at each stage end (one safetensors file, atomic), so that
``--resume`` continues an interrupted training exactly (and a finished one does not train again).
At the end the chosen router (``router.safetensors``) and the training curve
(``training_curve.csv`` / ``.png``) are saved there; the plan's provenance records lambda, theta,
max_run, iterations, lr and seed.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import AliasChoices, Field, model_validator

from planner.cfg import CfgLayout, cfg_halves, guided
from planner.search import Strategy, StrategySettings, register
from planner.search._router import (
    StepCalls,
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
        snapshots = trainer.train()
        common = common_params(s, s.level, trainer.progress.elapsed_s, mode=s.mode, iterations_per_lambda=s.iterations,
                               lambdas=list(s.lambdas), max_distance=s.max_distance if s.mode == "rollout" else 1)
        for g in snapshots:
            g.params = {**common, **g.params}
        how = f"of an l2c router ({s.level} level, {s.mode} mode)"
        if s.theta is not None:
            plan = plan_at_theta(context, budget, snapshots, s.theta, self.name, how)
        else:
            # every cap up to the trained window length: a cached value is never staler than trained
            runs = [None] if s.mode == "paper" else range(1, s.max_distance + 1)
            plan = choose_plan(context, budget, snapshots, self.name, how, max_runs=runs)
        trainer.save_beside_plan(plan)
        return plan
