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

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.errors import PlannerError
from planner.runner import CFG_COND_UNCOND, CFG_NONE, CFG_SEPARATE
from search import Strategy, register
from search._common import config_from_params
from search._router import (
    CHECKPOINT_FILE,
    Gates,
    Router,
    StepCalls,
    TrainingCurve,
    choose_plan,
    every_other_step,
    frozen,
    gate_costs,
    gated_modules,
    load_checkpoint,
    optimizer_tensors,
    plan_at_theta,
    progress_bar,
    record_calls,
    restore_optimizer,
    save_checkpoint,
    save_router,
)

CHECKPOINT_FORMAT = "l2c-checkpoint/1"


@dataclass(frozen=True)
class L2CConfig:
    """The strategy's parameters (``--param KEY=VALUE``), checked."""

    level: str = "block"  # block (residual reuse) or sublayer (attention and MLP apart, as the paper)
    mode: str = "rollout"  # rollout (beyond the paper) or paper (refresh every other step)
    max_distance: int = 6  # rollout: the longest window after the cache-filling step (and longest reuse run)
    sampling: str = "tile"  # tile: windows covering all steps per iteration; random: one window (the paper)
    loss: str = "raw"  # raw: MSE of the model output (the paper); guided: of the CFG-combined prediction
    lambdas: tuple[float, ...] = (0.0003, 0.001, 0.003)  # the lambda grid, smallest first
    iterations: int = 30  # per lambda; each iteration covers every step (sampling=tile)
    lr: float = 0.05
    init: float = 2.0  # initial score: gate 0.88, every module computes
    cost_weighted: bool = True  # penalty per gate weighted by the module's compute time (mean 1)
    theta: float | None = None  # a fixed threshold instead of the budget search
    checkpoint_every: int = 10
    log_every: int = 1
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> L2CConfig:
        """Check ``params`` (PlannerError naming the first bad one) and fill the defaults."""
        return config_from_params(cls, params, "l2c", aliases={"lambda": "lambdas"})

    def check(self) -> None:
        if self.level not in ("sublayer", "block"):
            raise PlannerError(f"level must be block or sublayer, got {self.level!r}")
        if self.mode not in ("rollout", "paper"):
            raise PlannerError(f"mode must be rollout or paper, got {self.mode!r}")
        if self.sampling not in ("tile", "random"):
            raise PlannerError(f"sampling must be tile or random, got {self.sampling!r}")
        if self.loss not in ("guided", "raw"):
            raise PlannerError(f"loss must be guided or raw, got {self.loss!r}")
        if self.max_distance < 1 or self.iterations < 1 or self.checkpoint_every < 1 or self.log_every < 1:
            raise PlannerError("max_distance, iterations, checkpoint_every and log_every must be at least 1")
        if not self.lambdas or any(not lam >= 0 for lam in self.lambdas):
            raise PlannerError(f"lambdas must be a non-empty list of non-negative numbers, got {list(self.lambdas)}")
        if not self.lr > 0:
            raise PlannerError(f"lr must be positive, got {self.lr:g}")
        if self.theta is not None and not 0 < self.theta <= 1:
            raise PlannerError(f"theta must lie in (0, 1], got {self.theta:g}")

    def training_key(self, level: str) -> dict:
        """What a checkpoint must agree on to be resumed (the settings that shape the training)."""
        keys = ("mode", "sampling", "loss", "max_distance", "lambdas", "iterations", "lr", "init", "cost_weighted", "seed")
        return {"level": level, **{k: list(v) if isinstance(v, tuple) else v for k, v in
                                   ((k, getattr(self, k)) for k in keys)}}


@dataclass
class TrainState:
    """Where training is: stage (lambda index), iteration within it, and the kept gates per finished stage."""

    stage: int = 0
    iteration: int = 0
    snapshots: list[Gates] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0


class Trainer:
    """Trains one router on a search context (see the module docstring)."""

    def __init__(self, context, cfg: L2CConfig, level: str, resume: bool = False):
        self.ctx = context
        self.cfg = cfg
        self.level = level
        self.resume = resume
        self.names = gated_modules(context.modules, level)
        fixed = every_other_step(context.steps, len(self.names)) if cfg.mode == "paper" else None
        # a reuse never lasts longer than the windows the router was trained on
        self.router = Router(self.names, context.steps, level, fixed, cfg.init, max_run=cfg.max_distance)
        self.optimizer = torch.optim.AdamW([self.router.scores], lr=cfg.lr, weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.layout = context.runner.cfg_layout(context.sampler)
        self.weights = gate_costs(context.latency, self.names) if cfg.cost_weighted else torch.ones(len(self.names))
        self.curve = TrainingCurve()
        self.state = TrainState()
        self.folder = Path(context.artifacts) / level if context.artifacts is not None else None
        self.calls: StepCalls | None = None
        self.scale = 1.0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def _meta(self) -> dict:
        ctx = self.ctx
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": ctx.runner.fingerprint(),
            "sampler": ctx.sampler.to_dict(),
            "calib_seeds": ctx.seeds,
            "training": self.cfg.training_key(self.level),
        }

    def save(self) -> None:
        """Write the checkpoint (scores, optimizer, generator, kept gates, curve), atomically."""
        if self.checkpoint_path is None:
            return
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors = {**self.router.tensors(), **opt_tensors, "rng": self.generator.get_state()}
        for i, g in enumerate(self.state.snapshots):
            tensors[f"snapshot.{i}"] = g.gates
        meta = {
            **self._meta(),
            "router": self.router.meta(),
            "optimizer": opt_meta,
            "stage": self.state.stage,
            "iteration": self.state.iteration,
            "elapsed_s": self.state.elapsed_s,
            "snapshots": [g.params for g in self.state.snapshots],
            "curve": self.curve.rows,
        }
        save_checkpoint(self.checkpoint_path, tensors, meta)

    def load(self) -> None:
        """Continue from the checkpoint; PlannerError when there is none or it was made for other settings."""
        if self.checkpoint_path is None:
            raise PlannerError("--resume needs a plan file whose folder holds the checkpoint (no artifacts folder)")
        if not self.checkpoint_path.is_file():
            raise PlannerError(f"nothing to resume: no checkpoint at {self.checkpoint_path}")
        tensors, meta = load_checkpoint(self.checkpoint_path)
        want = self._meta()
        for key, value in want.items():
            if meta.get(key) != value:
                raise PlannerError(
                    f"checkpoint {self.checkpoint_path} was made with another {key} ({meta.get(key)!r}, now {value!r}); "
                    "run without --resume to start over"
                )
        self.router.load_scores(tensors["scores"])
        restore_optimizer(self.optimizer, tensors, meta["optimizer"])
        self.generator.set_state(tensors["rng"])
        snaps = [Gates(tensors[f"snapshot.{i}"], self.names, self.level, self.router.fixed.clone(), p, self.router.max_run)
                 for i, p in enumerate(meta["snapshots"])]
        self.state = TrainState(int(meta["stage"]), int(meta["iteration"]), snaps, float(meta["elapsed_s"]))
        self.curve = TrainingCurve(list(meta["curve"]))

    # ------------------------------------------------------------------ training
    def window(self) -> tuple[int, int]:
        """``(fill step, last gated step)`` of one random window (see the module docstring)."""
        steps, g = self.ctx.steps, self.generator
        if self.cfg.mode == "paper":
            odd = torch.randint(0, steps // 2, (1,), generator=g).item()
            t = 2 * odd + 1
            return t - 1, t
        t0 = int(torch.randint(0, steps - 1, (1,), generator=g).item())
        longest = min(self.cfg.max_distance, steps - 1 - t0)
        d = int(torch.randint(1, longest + 1, (1,), generator=g).item())
        return t0, t0 + d

    def windows(self) -> list[tuple[int, int]]:
        """This iteration's windows: one random window (``sampling=random``, the paper's one pair per
        iteration), or windows of random length 1..max_distance tiling all steps (``sampling=tile``;
        paper mode: every (even, odd) pair), so that every gate gets its gradient every iteration."""
        if self.cfg.sampling == "random":
            return [self.window()]
        steps, out, t0 = self.ctx.steps, [], 0
        while t0 < steps - 1:
            if self.cfg.mode == "paper":
                d = 1
            else:
                longest = min(self.cfg.max_distance, steps - 1 - t0)
                d = int(torch.randint(1, longest + 1, (1,), generator=self.generator).item())
            out.append((t0, t0 + d))
            t0 += d + 1
        return out

    def step(self, lam: float) -> dict[str, float]:
        """One optimizer step on this iteration's windows; returns the loss parts."""
        from planner.executor import apply_gates

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
        with apply_gates(self.ctx.runner.pipe, mixed, self.names, cfg_layout=self.layout, detach_cache=False) as h:
            for t0, t1 in windows:
                with torch.no_grad(), h.at_step(t0):
                    self.calls.replay(transformer, t0)  # refreshes every cache entry
                for t in range(t0 + 1, t1 + 1):
                    with h.at_step(t):
                        outs = self.calls.replay(transformer, t)
                    mse = mse + torch.nn.functional.mse_loss(self._view(outs), self._view(self.calls.teacher(t)))
        mse = mse / len(gated) / self.scale
        penalty = (gates[gated] * self.weights).sum(dim=1).mean()
        loss = mse + lam * penalty
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.router.clamp_()
        return {"loss": loss.item(), "mse": mse.item(), "penalty": penalty.item()}

    def _view(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """What the loss compares: the guided prediction ``u + g (c - u)`` the sampler uses (``loss=guided``
        with CFG on), or the raw outputs of every call."""
        if self.cfg.loss == "raw" or self.layout == CFG_NONE:
            return torch.cat(outs)
        if self.layout == CFG_SEPARATE:
            cond, uncond = outs  # the executor's rule: cond's call comes first
        else:
            first, second = outs[0].chunk(2)
            cond, uncond = (first, second) if self.layout == CFG_COND_UNCOND else (second, first)
        return uncond + self.ctx.sampler.guidance * (cond - uncond)

    def _speedup_now(self, theta: float = 0.5) -> float:
        return self.ctx.predict(self.ctx.plan(self.router.decisions(theta)))[0]

    def train(self) -> list[Gates]:
        """Train through the lambda grid (or continue a checkpointed training); the kept gates per lambda."""
        if self.resume:
            self.load()
        cfg = self.cfg
        total = cfg.iterations * len(cfg.lambdas)
        done = self.state.stage * cfg.iterations + self.state.iteration
        if done >= total:
            return self.state.snapshots
        calls_per_step = 2 if self.layout == CFG_SEPARATE else 1
        self.calls = record_calls(self.ctx.runner, self.ctx.conditions, self.ctx.seeds, self.ctx.sampler, calls_per_step)
        self.scale = float(torch.stack([self._view(per).float().pow(2).mean() for per in self.calls.outputs]).mean())
        self.scale = self.scale if self.scale > 0 else 1.0
        bar = progress_bar(total, f"l2c {self.level}", self.ctx.progress, initial=done)
        start = time.perf_counter() - self.state.elapsed_s
        running = None
        try:
            with frozen(self.ctx.runner.transformer):
                while self.state.stage < len(cfg.lambdas):
                    lam = cfg.lambdas[self.state.stage]
                    while self.state.iteration < cfg.iterations:
                        parts = self.step(lam)
                        self.state.iteration += 1
                        done += 1
                        running = parts["loss"] if running is None else 0.9 * running + 0.1 * parts["loss"]
                        if done % cfg.log_every == 0 or self.state.iteration == cfg.iterations:
                            speed = self._speedup_now()
                            self.state.elapsed_s = time.perf_counter() - start
                            self.curve.add(iteration=done, stage=self.state.stage, **{"lambda": lam}, **parts,
                                           gate_mean=float(self.router.gates().detach()[~self.router.fixed].mean()),
                                           predicted_speedup=speed, elapsed_s=self.state.elapsed_s)
                            bar.set_postfix(loss=f"{running:.4g}", lam=f"{lam:g}", speedup=f"{speed:.2f}x")
                        bar.update(1)
                        if self.state.iteration < cfg.iterations and done % cfg.checkpoint_every == 0:
                            self.state.elapsed_s = time.perf_counter() - start
                            self.save()
                    self.state.snapshots.append(Gates.of(self.router, **{"lambda": lam, "iterations": done}))
                    self.state.stage += 1
                    self.state.iteration = 0
                    self.state.elapsed_s = time.perf_counter() - start
                    self.save()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None and self.checkpoint_path.is_file():
                print(f"l2c: interrupted; `--resume` continues from the checkpoint in {self.folder}", file=sys.stderr)
            raise
        finally:
            bar.close()
        return self.state.snapshots


@register
class L2C(Strategy):
    """Params (``--param KEY=VALUE``): ``level`` (block, sublayer), ``mode`` (rollout, paper),
    ``sampling`` (tile, random), ``loss`` (raw, guided), ``max_distance``, ``lambdas`` (a JSON list)
    or ``lambda``, ``iterations`` (per lambda), ``lr``, ``init``, ``cost_weighted``, ``theta`` (fixed),
    ``checkpoint_every``, ``log_every``; run options ``--seed`` and ``--resume``. See the module
    docstring."""

    name = "l2c"

    def search(self, context, budget):
        cfg = L2CConfig.from_params(self.params)
        resume = bool(self.params.get("resume", False))
        level = cfg.level
        trainer = Trainer(context, cfg, level, resume=resume)
        snapshots = trainer.train()
        common = {"level": level, "mode": cfg.mode, "lr": cfg.lr, "seed": cfg.seed, "iterations_per_lambda": cfg.iterations,
                  "lambdas": list(cfg.lambdas), "max_distance": cfg.max_distance if cfg.mode == "rollout" else 1,
                  "cost_weighted": cfg.cost_weighted, "init": cfg.init, "train_s": round(trainer.state.elapsed_s, 2)}
        for g in snapshots:
            g.params = {**common, **g.params}
        how = f"of an l2c router ({level} level, {cfg.mode} mode)"
        if cfg.theta is not None:
            plan = plan_at_theta(context, budget, snapshots, cfg.theta, self.name, how)
        else:
            # every cap up to the trained window length: a cached value is never staler than trained
            runs = [None] if cfg.mode == "paper" else range(1, cfg.max_distance + 1)
            plan = choose_plan(context, budget, snapshots, self.name, how, max_runs=runs)
        self._save(trainer, plan)
        return plan

    def _save(self, trainer: Trainer, plan) -> None:
        """The chosen router and the training curve beside the plan (when the context has a folder)."""
        if trainer.folder is None:
            return
        params = plan.provenance.params
        chosen = next(g for g in trainer.state.snapshots if g.params["lambda"] == params["lambda"])
        router = chosen.router(max_run=params.get("max_run"))
        save_router(trainer.folder.parent, router, {"lambda": params["lambda"], "theta": params["theta"],
                                                   "iterations": chosen.params["iterations"], "lr": params["lr"],
                                                   "seed": params["seed"]})
        trainer.curve.save(trainer.folder.parent)
