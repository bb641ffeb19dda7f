"""The training loop shared by the learned routers (``l2c``, ``harmonica``): a grid of penalty weights,
checkpoints and exact resume, the training curve, the progress bar, and the router beside the plan.

A trainer trains one :class:`~planner.search._router.Router` through *stages*, one per penalty weight
of its grid (smallest first, each warm-started from the previous one; one optimizer throughout),
each of ``units`` training units (an l2c iteration, a harmonica round). After each stage the gates
are kept (:class:`~planner.search._router.Gates`); the strategy then picks the best hard plan among
them. Subclasses say what a unit is (:meth:`RouterTrainer.train_unit`) and what state of their own a
checkpoint holds; everything else is here.

Checkpoints (``<level>/checkpoint.safetensors`` in ``context.checkpoints``, the plan's folder itself
while ``context.artifacts`` is the temporary folder the by-products are staged in; one safetensors
file written atomically, no pickle): the scores, the optimizer's state, the kept gates, the curve and the
subclass's state, every ``checkpoint_every`` units and at each stage end. ``resume`` continues
exactly; a checkpoint made with other settings, for another model or sampler, or holding counters
outside the grid is refused in one line.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from planner.errors import PlannerError
from planner.search._router import (
    CHECKPOINT_FILE,
    Gates,
    Router,
    TrainingCurve,
    gate_costs,
    gated_modules,
    load_checkpoint,
    optimizer_tensors,
    progress_bar,
    restore_optimizer,
    save_checkpoint,
    save_router,
)


@dataclasses.dataclass
class Progress:
    """Where training is: the stage (index into the grid), the unit within it, the kept gates."""

    stage: int = 0
    unit: int = 0
    snapshots: list[Gates] = dataclasses.field(default_factory=list)
    elapsed_s: float = 0.0


class RouterTrainer:
    """Trains a router on a search context over a grid of penalty weights (see the module docstring)."""

    format: ClassVar[str]  # checkpoint format, e.g. "l2c-checkpoint/1"
    penalty: ClassVar[str]  # the grid's name in records: "lambda", "beta"
    unit_name: ClassVar[str]  # "iteration", "round"

    def __init__(self, context, settings, level: str, grid: tuple[float, ...], units: int, *,
                 fixed: torch.Tensor | None = None, max_run: int | None = None, resume: bool = False):
        self.ctx = context
        self.settings = settings
        self.level = level
        self.grid = tuple(grid)
        self.units = int(units)
        self.resume = resume
        self.names = gated_modules(context.modules, level)
        self.router = Router(self.names, context.steps, level, fixed, settings.init, max_run=max_run)
        self.optimizer = torch.optim.AdamW([self.router.scores], lr=settings.lr, weight_decay=0.0)
        self.layout = context.layout
        self.weights = gate_costs(context.latency, self.names) if settings.cost_weighted else torch.ones(len(self.names))
        self.curve = TrainingCurve()
        self.progress = Progress()
        # The checkpoints live where a killed search's --resume finds them: the plan's folder (context.checkpoints),
        # not the temporary folder its by-products are staged in (context.artifacts) until the plan is written.
        work = getattr(context, "checkpoints", None) or context.artifacts
        self.folder = Path(work) / level if work is not None else None

    # ------------------------------------------------------------------ what subclasses say
    def training_key(self) -> dict:
        """The settings that shape training: a checkpoint made with other values is not resumed."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work done once before the first unit of this process (e.g. recording teacher outputs)."""

    def train_unit(self, weight: float, index: int) -> dict[str, Any]:
        """One unit of training at penalty ``weight`` (``index`` counts units over all stages); returns
        the figures for the curve and the progress bar (``loss`` at least; counters ``iteration`` and
        ``round`` lead the curve's columns), or ``{}`` to log nothing."""
        raise NotImplementedError

    def snapshot_params(self, weight: float, done: int) -> dict:
        """What the kept gates of a finished stage record."""
        return {self.penalty: weight, "iterations": done}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_meta(self) -> dict:
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Take back what :meth:`state_tensors` and :meth:`state_meta` saved."""

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.folder is None else self.folder / CHECKPOINT_FILE

    def _identity(self) -> dict:
        ctx = self.ctx
        return {"format": self.format, "fingerprint": ctx.runner.fingerprint(), "sampler": ctx.sampler.to_dict(),
                "calib_seeds": ctx.seeds, "training": self.training_key()}

    def save(self) -> None:
        """Write the checkpoint (scores, optimizer, kept gates, curve, subclass state), atomically."""
        if self.checkpoint_path is None:
            return
        p = self.progress
        opt_tensors, opt_meta = optimizer_tensors(self.optimizer)
        tensors = {**self.router.tensors(), **opt_tensors, **self.state_tensors()}
        tensors.update({f"snapshot.{i}": g.gates for i, g in enumerate(p.snapshots)})
        meta = {**self._identity(), "router": self.router.meta(), "optimizer": opt_meta, "stage": p.stage,
                self.unit_name: p.unit, "elapsed_s": p.elapsed_s, "snapshots": [g.params for g in p.snapshots],
                "curve": self.curve.rows, **self.state_meta()}
        save_checkpoint(self.checkpoint_path, tensors, meta)

    def load(self) -> None:
        """Continue from the checkpoint; PlannerError when there is none, it was made for other settings,
        or its counters lie outside this training's grid."""
        path = self.checkpoint_path
        if path is None:
            raise PlannerError("--resume needs a plan file whose folder holds the checkpoint (no artifacts folder)")
        if not path.is_file():
            raise PlannerError(f"nothing to resume: no checkpoint at {path}")
        tensors, meta = load_checkpoint(path)
        for key, value in self._identity().items():
            if meta.get(key) != value:
                raise PlannerError(f"checkpoint {path} was made with another {key} ({meta.get(key)!r}, now {value!r}); "
                                   "run without --resume to start over")
        try:
            stage, unit, elapsed = int(meta["stage"]), int(meta[self.unit_name]), float(meta["elapsed_s"])
            kept = list(meta["snapshots"])
            if not (0 <= stage <= len(self.grid) and 0 <= unit <= self.units and len(kept) == stage):
                raise PlannerError(f"checkpoint {path} is damaged: stage {stage}, {self.unit_name} {unit}, "
                                   f"{len(kept)} kept gates for a grid of {len(self.grid)} x {self.units}")
            self.router.load_scores(tensors["scores"])
            restore_optimizer(self.optimizer, tensors, meta["optimizer"])
            snaps = [Gates(tensors[f"snapshot.{i}"], self.names, self.level, self.router.fixed.clone(), p,
                           self.router.max_run) for i, p in enumerate(kept)]
            self.load_state(tensors, meta)
            self.curve = TrainingCurve(list(meta["curve"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch refusing a tensor
            raise PlannerError(f"checkpoint {path} is damaged or incomplete ({type(e).__name__}: {e})") from None
        self.progress = Progress(stage, unit, snaps, elapsed)

    # ------------------------------------------------------------------ the loop
    def predicted_speedup(self, theta: float = 0.5) -> float:
        """The latency model's speedup of the router's hard plan at ``theta``."""
        return self.ctx.predict(self.ctx.plan(self.router.decisions(theta)))[0]

    def train(self) -> list[Gates]:
        """Train through the grid (or continue a checkpointed training); the kept gates per grid value."""
        if self.resume:
            self.load()
        p = self.progress
        done = p.stage * self.units + p.unit
        total = self.units * len(self.grid)
        if done >= total:
            return p.snapshots
        self.prepare()
        bar = progress_bar(total, f"{self.format.split('-')[0]} {self.level}", self.ctx.progress, initial=done)
        start = time.perf_counter() - p.elapsed_s
        try:
            while p.stage < len(self.grid):
                weight = self.grid[p.stage]
                while p.unit < self.units:
                    figures = self.train_unit(weight, done)
                    p.unit += 1
                    done += 1
                    p.elapsed_s = time.perf_counter() - start
                    if figures:
                        speed = self.predicted_speedup()
                        gates = self.router.gates().detach()[~self.router.fixed]
                        counters = {k: figures.pop(k) for k in ("iteration", "round") if k in figures}
                        self.curve.add(**counters, stage=p.stage, **{self.penalty: weight}, **figures,
                                       gate_mean=float(gates.mean()), predicted_speedup=speed, elapsed_s=p.elapsed_s)
                        bar.set_postfix(loss=f"{figures['loss']:.4g}", **{self.penalty[:3]: f"{weight:g}"},
                                        speedup=f"{speed:.2f}x")
                    bar.update(1)
                    if p.unit < self.units and done % self.settings.checkpoint_every == 0:
                        self.save()
                p.snapshots.append(Gates.of(self.router, **self.snapshot_params(weight, done)))
                p.stage += 1
                p.unit = 0
                p.elapsed_s = time.perf_counter() - start
                self.save()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None and self.checkpoint_path.is_file():
                print(f"{self.format.split('-')[0]}: interrupted; `--resume` continues from the checkpoint in "
                      f"{self.folder}", file=sys.stderr)
            raise
        finally:
            bar.close()
        return p.snapshots

    def save_beside_plan(self, plan, extra: dict | None = None) -> None:
        """The chosen router (``router.safetensors``) and the training curve in the plan's folder."""
        if self.ctx.artifacts is None:
            return
        params = plan.provenance.params
        chosen = next(g for g in self.progress.snapshots if g.params[self.penalty] == params[self.penalty])
        router = chosen.router(max_run=params.get("max_run"))
        record = {self.penalty: params[self.penalty], "theta": params["theta"],
                  "iterations": chosen.params["iterations"], "lr": params["lr"], "seed": params["seed"], **(extra or {})}
        save_router(self.ctx.artifacts, router, record)
        self.curve.save(self.ctx.artifacts)


def common_params(settings, level: str, train_s: float, **extra: Any) -> dict:
    """What every kept candidate of a learned router records in its plan's provenance."""
    return {"level": level, "lr": settings.lr, "seed": settings.seed, "cost_weighted": settings.cost_weighted,
            "init": settings.init, "train_s": round(train_s, 2), **extra}
