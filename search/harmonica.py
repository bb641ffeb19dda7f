"""``harmonica``: HarmoniCa (Huang et al., ICML 2025): a learned router trained by Step-Wise Denoising
Training (SDT) under the Image-Error-Proxy-guided objective (IEPO).

The router is the shared one (:mod:`search._router`): a score table ``[steps, gated modules]``,
gate = sigmoid(score), scores clamped to [-5, 5], step 0 always computes, one gate for both CFG
branches. The model's weights are frozen; only the scores learn.

**SDT** (:mod:`search._harmonica_sdt`): each training round is a full sampling run from fresh noise
with the sampler the plan targets (no training images). At every step the teacher is the frozen
full model on the *student's* current x_t, the student is the soft-gated model (the executor's
``apply_gates``: gated modules return ``s * fresh + (1 - s) * cached``), one optimizer update per
step, and the next x_t comes from the student's (detached) prediction. Unlike ``l2c``, which trains
on the full-compute trajectory, training sees the inputs and cache states that the earlier cached
steps really produce.

**IEPO** (:mod:`search._harmonica_proxy`): loss_t = lambda_t * MSE(student, teacher) / E[teacher^2]
+ beta * sum_j w_j s_tj (w: each module's compute time, mean 1, with ``cost_weighted``). lambda
starts uniform and is recomputed every ``proxy_every`` optimizer updates (at the next round
boundary) by gradient-free runs of the calibration inputs (fixed noise) under the hard plan the
current gates give at the budget's threshold: ``proxy=paper`` (final-output error with caching
disabled at step t only) or ``proxy=released`` (marginal error when caching is switched on from the
last step backwards); ``proxy=uniform`` keeps lambda = 1 (SDT alone). lambda is normalised to mean 1
with a floor (``proxy_floor``).

**Budget** (beta, theta and a run cap, as ``l2c``): the router is trained on a small beta grid,
smallest first, each stage warm-started from the previous one; the gates are kept after each stage.
For each kept set and each cap on consecutive reuses in ``max_runs`` (``None``: no cap), the
threshold theta is found by bisection on the latency model (the least reuse that meets
``--budget``), each hard plan runs on the calibration inputs, and the least-error one wins
(:func:`search._router.choose_plan`); with ``--max-error`` the fastest plan within the target.
The cap is what makes the hard plans usable: the soft student mixes ``s * fresh + (1 - s) *
cached`` at every step, so the cache it trains on is refreshed a little every step and never goes
as stale as a run of hard zeros. Measured on digits-dit, DDIM-20, 8 calibration samples
(calibration rel. L1): at 1.5x 0.244 without caps, 0.048 with them; at 2x 0.166 with them (l2c
0.049 / 0.143, greedy 0.023 / 0.120 at 1.5x / 2x). ``benchmarks/harmonica_bench.py`` compares it
with ``l2c`` and ``greedy`` on held-out seeds (README): on digits-dit it does not beat ``l2c``.

Tried and not kept (same setting, 2x): a straight-through student (the budget's hard plan runs
in the rollout, its gradient goes to the soft gates) 0.175; 24 rounds per beta 0.162; lambda
recomputed every 2 rounds 0.161; lr 0.1 0.166; batch 16 0.166; the uniform proxy (SDT alone)
0.158 and the released proxy 0.166 against the paper's 0.166. No setting moved the error beyond
the spread between seeds, so the defaults stay the paper's.

**Levels**: ``block`` (default: a gate of 0 becomes residual reuse ``D``) or ``sublayer``
(attention and MLP apart, as the paper; a gate of 0 becomes ``R``). As for ``l2c``, sub-layer reuse
on digits-dit keeps each block's norms and modulation and cannot pass 1.71x.

**Checkpoints** (``context.artifacts/<level>/checkpoint.safetensors``): scores, AdamW's state,
lambda, the kept gates, the training curve and the proxy history, every ``checkpoint_every``
rounds and at each stage end; ``--resume`` continues exactly (a round's noise depends only on
``seed`` and the round's index). Beside the plan at the end: the chosen router
(``router.safetensors``), ``training_curve.csv``/``.png`` and ``proxy.csv`` (lambda per step at
every recomputation).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.errors import PlannerError
from planner.evaluate import EVAL_SEED_BASE
from planner.io import write_atomic
from planner.runner import CFG_SEPARATE
from search import Strategy, register
from search._common import config_from_params
from search._harmonica_proxy import PROXIES, normalise, raw_proxy, summary
from search._harmonica_sdt import StepwiseDistillation
from search._router import (
    CHECKPOINT_FILE,
    Gates,
    Router,
    TrainingCurve,
    choose_plan,
    decisions_from_gates,
    frozen,
    gate_costs,
    gated_modules,
    load_checkpoint,
    optimizer_tensors,
    plan_at_theta,
    progress_bar,
    restore_optimizer,
    save_checkpoint,
    save_router,
    theta_for_speedup,
)

CHECKPOINT_FORMAT = "harmonica-checkpoint/1"
PROXY_FILE = "proxy.csv"
# Training noise comes from seeds in [TRAIN_SEED_MIN, EVAL_SEED_BASE): never a calibration seed
# (0..N-1 for any sensible N) nor an evaluation seed.
TRAIN_SEED_MIN = 100_000


@dataclass(frozen=True)
class HarmoniCaConfig:
    """The strategy's parameters (``--param KEY=VALUE``), checked."""

    level: str = "block"  # block (residual reuse) or sublayer (attention and MLP apart, as the paper)
    proxy: str = "paper"  # paper, released or uniform
    betas: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)  # the penalty grid, smallest first
    rounds: int = 12  # rollouts per beta (each gives steps - 1 optimizer updates)
    batch: int = 8  # samples per rollout
    lr: float = 0.05
    init: float = 2.0  # initial score: gate 0.88, every module computes
    cost_weighted: bool = True
    proxy_every: int = 100  # optimizer updates between lambda recomputations (the paper's C)
    proxy_floor: float = 0.1
    theta: float | None = None  # a fixed threshold instead of the budget search
    max_runs: tuple[int | None, ...] = (None, 1, 2, 3, 4, 6)  # caps on consecutive reuses the hard plans try
    checkpoint_every: int = 4  # rounds
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict) -> HarmoniCaConfig:
        """Check ``params`` (PlannerError naming the first bad one) and fill the defaults."""
        return config_from_params(cls, params, "harmonica", aliases={"beta": "betas"})

    def check(self) -> None:
        if self.level not in ("sublayer", "block"):
            raise PlannerError(f"level must be block or sublayer, got {self.level!r}")
        if not self.max_runs or any(r is not None and r < 1 for r in self.max_runs):
            raise PlannerError(f"max_runs must be a non-empty list of caps of at least 1 (null: no cap), got {list(self.max_runs)}")
        if self.proxy not in PROXIES:
            raise PlannerError(f"proxy must be one of {', '.join(PROXIES)}, got {self.proxy!r}")
        if min(self.rounds, self.batch, self.proxy_every, self.checkpoint_every) < 1:
            raise PlannerError("rounds, batch, proxy_every and checkpoint_every must be at least 1")
        if not self.betas or any(not b >= 0 for b in self.betas):
            raise PlannerError(f"betas must be a non-empty list of non-negative numbers, got {list(self.betas)}")
        if not self.lr > 0:
            raise PlannerError(f"lr must be positive, got {self.lr:g}")
        if not 0 <= self.proxy_floor <= 1:
            raise PlannerError(f"proxy_floor must lie in [0, 1], got {self.proxy_floor:g}")
        if self.theta is not None and not 0 < self.theta <= 1:
            raise PlannerError(f"theta must lie in (0, 1], got {self.theta:g}")
        if self.seed < 0:
            raise PlannerError(f"seed must be non-negative, got {self.seed}")

    def training_key(self, level: str, budget) -> dict:
        """What a checkpoint must agree on to be resumed (everything that shapes the training)."""
        keys = ("proxy", "betas", "rounds", "batch", "lr", "init", "cost_weighted", "proxy_every", "proxy_floor", "seed")
        return {"level": level, "budget": budget.to_dict(),
                **{k: list(getattr(self, k)) if k == "betas" else getattr(self, k) for k in keys}}


def round_seeds(seed: int, index: int, batch: int) -> list[int]:
    """The noise seeds of training round ``index``: fresh for every round, a function of ``(seed, index)``
    only (so a resumed training draws the same noise), inside ``[TRAIN_SEED_MIN, EVAL_SEED_BASE)``."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    return torch.randint(TRAIN_SEED_MIN, EVAL_SEED_BASE, (batch,), generator=gen).tolist()


@dataclass
class TrainState:
    """Where training is: beta stage, round within it, optimizer updates so far, lambda, kept gates."""

    stage: int = 0
    round: int = 0
    iterations: int = 0
    lambdas: torch.Tensor | None = None
    proxy_at: int = 0  # iterations at the last lambda recomputation
    snapshots: list[Gates] = dataclasses.field(default_factory=list)
    proxy_rows: list[dict] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0


class Trainer:
    """Trains one router on a search context by SDT + IEPO (see the module docstring)."""

    def __init__(self, context, cfg: HarmoniCaConfig, level: str, budget, resume: bool = False):
        self.ctx = context
        self.cfg = cfg
        self.level = level
        self.budget = budget
        self.resume = resume
        self.names = gated_modules(context.modules, level)
        self.router = Router(self.names, context.steps, level, None, cfg.init)
        self.optimizer = torch.optim.AdamW([self.router.scores], lr=cfg.lr, weight_decay=0.0)
        self.layout = context.runner.cfg_layout(context.sampler)
        self.calls_per_step = 2 if self.layout == CFG_SEPARATE else 1
        self.weights = gate_costs(context.latency, self.names) if cfg.cost_weighted else torch.ones(len(self.names))
        self.curve = TrainingCurve()
        self.state = TrainState(lambdas=torch.ones(context.steps))
        self.folder = Path(context.artifacts) / level if context.artifacts is not None else None

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
            "training": self.cfg.training_key(self.level, self.budget),
        }

    def save(self) -> None:
        """Write the checkpoint (scores, optimizer, lambda, kept gates, curve, proxy history), atomically."""
        if self.checkpoint_path is None:
            return
        s = self.state
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors = {**self.router.tensors(), **opt_tensors, "lambdas": s.lambdas}
        tensors.update({f"snapshot.{i}": g.gates for i, g in enumerate(s.snapshots)})
        meta = {**self._meta(), "router": self.router.meta(), "optimizer": opt_meta, "stage": s.stage,
                "round": s.round, "iterations": s.iterations, "proxy_at": s.proxy_at, "elapsed_s": s.elapsed_s,
                "snapshots": [g.params for g in s.snapshots], "curve": self.curve.rows, "proxy_rows": s.proxy_rows}
        save_checkpoint(self.checkpoint_path, tensors, meta)

    def load(self) -> None:
        """Continue from the checkpoint; PlannerError when there is none or it was made for other settings."""
        path = self.checkpoint_path
        if path is None:
            raise PlannerError("--resume needs a plan file whose folder holds the checkpoint (no artifacts folder)")
        if not path.is_file():
            raise PlannerError(f"nothing to resume: no checkpoint at {path}")
        tensors, meta = load_checkpoint(path)
        for key, value in self._meta().items():
            if meta.get(key) != value:
                raise PlannerError(f"checkpoint {path} was made with another {key} ({meta.get(key)!r}, now {value!r}); "
                                   "run without --resume to start over")
        try:
            self.router.load_scores(tensors["scores"])
            restore_optimizer(self.optimizer, tensors, meta["optimizer"])
            snaps = [Gates(tensors[f"snapshot.{i}"], self.names, self.level, self.router.fixed.clone(), p)
                     for i, p in enumerate(meta["snapshots"])]
            self.state = TrainState(int(meta["stage"]), int(meta["round"]), int(meta["iterations"]),
                                    tensors["lambdas"].float(), int(meta["proxy_at"]), snaps,
                                    list(meta["proxy_rows"]), float(meta["elapsed_s"]))
        except KeyError as e:
            raise PlannerError(f"checkpoint {path} lacks {e.args[0]!r}") from None
        self.curve = TrainingCurve(list(meta["curve"]))

    # ------------------------------------------------------------------ SDT
    def round(self, beta: float, index: int, record: bool = False) -> StepwiseDistillation:
        """One SDT round (a full rollout from the fresh noise of round ``index``); returns its hooks' record."""
        from planner.executor import apply_gates

        ctx, cfg = self.ctx, self.cfg
        seeds = round_seeds(cfg.seed, index, cfg.batch)
        conditions = ctx.runner.conditions(cfg.batch, seed=seeds[0])
        sdt = StepwiseDistillation(ctx.runner.transformer, self.router, self.optimizer, self.state.lambdas, beta,
                                   self.weights, self.calls_per_step, record=record)
        gated = apply_gates(ctx.runner.pipe, sdt.gates, self.names, cfg_layout=self.layout)
        with frozen(ctx.runner.transformer), gated, sdt:
            ctx.runner.run(conditions, seeds, ctx.sampler, output="latent")
        sdt.check_complete(ctx.steps)
        self.state.iterations += ctx.steps - 1
        return sdt

    # ------------------------------------------------------------------ IEPO
    def proxy_theta(self) -> float:
        """The threshold of the hard plan lambda is measured on: the budget's (the plan training aims
        at; every free entry reuses if even that misses), or 0.5 for an error target."""
        if self.cfg.theta is not None:
            return self.cfg.theta
        if self.budget.speedup is None:
            return 0.5
        found = theta_for_speedup(self.ctx, self.router, self.budget.speedup)
        return found[0] if found is not None else 1.0 + 1e-9

    def final(self, mask: torch.Tensor) -> torch.Tensor:
        """Final latents of the calibration inputs under the hard plan of a 0/1 ``mask`` (1 = compute)."""
        from planner.executor import apply_plan

        ctx = self.ctx
        plan = ctx.plan(decisions_from_gates(mask.float(), self.names, self.level, 0.5))
        with apply_plan(ctx.runner.pipe, plan):
            return ctx.runner.run(ctx.conditions, ctx.seeds, ctx.sampler, output="latent")

    def update_lambdas(self) -> None:
        """Recompute lambda (gradient-free runs from the calibration noise) and log it."""
        s = self.state
        theta = self.proxy_theta()
        hard = self.router.hard_gates(theta)
        with torch.no_grad():
            raw = raw_proxy(self.final, hard, self.cfg.proxy, full=self.ctx.reference)
        s.lambdas = normalise(raw, self.cfg.proxy_floor)
        s.proxy_at = s.iterations
        for t in range(self.ctx.steps):
            s.proxy_rows.append({"iteration": s.iterations, "theta": float(theta), "step": t,
                                 "cached_fraction": float(1 - hard[t].mean()), "raw": float(raw[t]),
                                 "lambda": float(s.lambdas[t])})

    # ------------------------------------------------------------------ the loop
    def _speedup_now(self, theta: float = 0.5) -> float:
        return self.ctx.predict(self.ctx.plan(self.router.decisions(theta)))[0]

    def train(self) -> list[Gates]:
        """Train through the beta grid (or continue a checkpointed training); the kept gates per beta."""
        if self.resume:
            self.load()
        cfg, s = self.cfg, self.state
        total = cfg.rounds * len(cfg.betas)
        done = s.stage * cfg.rounds + s.round
        if done >= total:
            return s.snapshots
        bar = progress_bar(total, f"harmonica {self.level} ({cfg.proxy})", self.ctx.progress, initial=done)
        start = time.perf_counter() - s.elapsed_s
        try:
            while s.stage < len(cfg.betas):
                beta = cfg.betas[s.stage]
                while s.round < cfg.rounds:
                    if cfg.proxy != "uniform" and s.iterations - s.proxy_at >= cfg.proxy_every:
                        self.update_lambdas()
                    parts = self.round(beta, done).summary()
                    s.round += 1
                    done += 1
                    s.elapsed_s = time.perf_counter() - start
                    speed = self._speedup_now()
                    gates = self.router.gates().detach()[~self.router.fixed]
                    self.curve.add(iteration=s.iterations, round=done, stage=s.stage, beta=beta, **parts,
                                   gate_mean=float(gates.mean()), lambda_min=float(s.lambdas[1:].min()),
                                   lambda_max=float(s.lambdas[1:].max()), predicted_speedup=speed,
                                   elapsed_s=s.elapsed_s)
                    bar.set_postfix(loss=f"{parts['loss']:.4g}", beta=f"{beta:g}", lam=summary(s.lambdas),
                                    speedup=f"{speed:.2f}x")
                    bar.update(1)
                    if s.round < cfg.rounds and done % cfg.checkpoint_every == 0:
                        self.save()
                s.snapshots.append(Gates.of(self.router, beta=beta, iterations=s.iterations))
                s.stage += 1
                s.round = 0
                s.elapsed_s = time.perf_counter() - start
                self.save()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None and self.checkpoint_path.is_file():
                print(f"harmonica: interrupted; `--resume` continues from the checkpoint in {self.folder}", file=sys.stderr)
            raise
        finally:
            bar.close()
        return s.snapshots


@register
class HarmoniCa(Strategy):
    """Params (``--param KEY=VALUE``): ``level`` (block, sublayer), ``proxy`` (paper, released,
    uniform), ``betas`` (a JSON list) or ``beta``, ``rounds`` (rollouts per beta), ``batch``, ``lr``,
    ``init``, ``cost_weighted``, ``proxy_every`` (optimizer updates), ``proxy_floor``, ``theta`` (fixed),
    ``max_runs`` (a JSON list, null = no cap), ``checkpoint_every`` (rounds); run options ``--seed`` and
    ``--resume``. See the module docstring."""

    name = "harmonica"

    def __init__(self, **params):
        super().__init__(**params)
        self.cfg = HarmoniCaConfig.from_params(params)  # bad parameters fail before any model is loaded

    def search(self, context, budget):
        cfg = self.cfg
        level = cfg.level
        trainer = Trainer(context, cfg, level, budget, resume=bool(self.params.get("resume", False)))
        snapshots = trainer.train()
        common = {"level": level, "proxy": cfg.proxy, "lr": cfg.lr, "seed": cfg.seed, "betas": list(cfg.betas),
                  "rounds_per_beta": cfg.rounds, "batch": cfg.batch, "proxy_every": cfg.proxy_every,
                  "proxy_floor": cfg.proxy_floor, "cost_weighted": cfg.cost_weighted, "init": cfg.init,
                  "max_runs": list(cfg.max_runs),
                  "train_s": round(trainer.state.elapsed_s, 2)}
        for g in snapshots:
            g.params = {**common, **g.params}
        how = f"of a harmonica router ({level} level, {cfg.proxy} proxy)"
        if cfg.theta is not None:
            plan = plan_at_theta(context, budget, snapshots, cfg.theta, self.name, how)
        else:
            plan = choose_plan(context, budget, snapshots, self.name, how, max_runs=cfg.max_runs)
        self._save(trainer, plan)
        return plan

    def _save(self, trainer: Trainer, plan) -> None:
        """The chosen router, the training curve and the proxy history beside the plan (when there is a folder)."""
        if trainer.folder is None:
            return
        import pandas as pd

        params = plan.provenance.params
        chosen = next(g for g in trainer.state.snapshots if g.params["beta"] == params["beta"])
        router = chosen.router(max_run=params.get("max_run"))
        save_router(trainer.folder.parent, router, {
            "beta": params["beta"], "theta": params["theta"], "iterations": chosen.params["iterations"],
            "lr": params["lr"], "seed": params["seed"], "proxy": params["proxy"],
            "lambda": [round(float(x), 4) for x in trainer.state.lambdas]})
        trainer.curve.save(trainer.folder.parent)
        rows = pd.DataFrame(trainer.state.proxy_rows)
        write_atomic(trainer.folder.parent / PROXY_FILE, lambda tmp: rows.to_csv(tmp, index=False))
