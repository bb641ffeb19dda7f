"""The learned router shared by the learned strategies (``l2c``, and HarmoniCa on top of it).

Not a strategy itself (its name starts with ``_``, so the registry skips it). What it gives:

**Which modules are gated** -- :func:`gated_modules` ``(modules, level)``: ``level="sublayer"`` gates
every attention / cross-attention / MLP sub-layer (as L2C does), ``level="block"`` every block.
:data:`REUSE_CODE` says what a gate of 0 becomes in a hard plan: ``R`` for sub-layers (reuse the
output before the block's gate and residual), ``D`` for blocks (reuse the residual). The executor's
soft gates do the same (``planner.executor.apply_gates``; blocks mix with residual reuse).

**The router** -- :class:`Router` ``(modules, steps, level, fixed=None, init=2.0, max_run=None)``: a score table
``scores`` of shape ``[steps, len(modules)]`` (a leaf tensor with ``requires_grad``; the model's
weights are never touched), ``gates() = sigmoid(scores)`` with *fixed* entries held at 1 (step 0
always: nothing is cached before it; :func:`every_other_step` fixes the even steps too, L2C's
paper mode). ``clamp_()`` keeps scores in ``[-SCORE_LIMIT, SCORE_LIMIT] = [-5, 5]`` (call it after
each optimizer step). One gate per (step, module) serves both CFG branches, as in the paper.

**Soft to hard** -- ``router.decisions(theta)``: gate >= theta -> ``C``, else the level's reuse code;
fixed entries and step 0 ``C``; with ``max_run`` a module computes after that many reuses in a row
(a cached value never gets older than the router was trained for); both CFG branches get the same
string. ``router.hard_gates(theta)`` is the same thing as a 0/1 tensor for ``apply_gates`` (with
those gates the soft run equals the hard plan's run: exactly for sub-layers, up to float rounding
for blocks). :func:`theta_candidates` lists the thresholds at which the hard plan changes.
:class:`Gates` is a detached snapshot of a router's gates with the same ``decisions(theta)``.

**Budget** -- :func:`theta_for_speedup` ``(context, router_or_gates, speedup)``: the smallest
threshold whose hard plan's predicted speedup (the profile's latency model) meets ``speedup``, by
bisection over :func:`theta_candidates`; ``None`` when even reusing every free entry misses.
:func:`choose_plan` ``(context, budget, candidates, strategy)``: each :class:`Gates` snapshot (gates
from one training setting, e.g. one lambda, plus its params) gets its threshold (speed budget:
bisection on the latency model; error target: the largest threshold whose calibration error stays
within it, by bisection on ``context.evaluate``), its hard plan is evaluated on the calibration
inputs, and the least-error plan (speed budget) or the fastest plan (error target) wins; its
provenance params get ``theta`` and ``max_run``. ``max_runs=[1, 2, ...]`` tries each candidate
under each cap on consecutive reuses as well (evaluations are cheap next to training).

**Training helpers** -- :func:`record_calls` runs the calibration inputs once at full compute and
keeps every transformer call (its inputs = the x_t of the full trajectory, and its output = the
teacher), grouped by step (:class:`StepCalls`, ``replay(step)`` calls the transformer again on
them); :func:`frozen` freezes the model's weights for the duration; :func:`gate_costs` gives each
gated module's compute time (latency model) normalised to mean 1, for a cost-weighted penalty.

**Checkpoints and by-products** -- :func:`save_checkpoint` / :func:`load_checkpoint`: one
safetensors file holding the tensors (scores, optimizer moments, RNG state, ...) with a JSON
metadata record (iteration, params, training curve), written atomically; :func:`optimizer_tensors`
/ :func:`restore_optimizer` (de)serialise a torch optimizer's state into it (no pickle). The
router beside the plan: :func:`save_router` / :func:`load_router` (``router.safetensors``).
:class:`TrainingCurve` collects rows and writes ``training_curve.csv`` (and a PNG) atomically.
:func:`progress_bar` is the tqdm bar the trainers show (loss, predicted speedup in its postfix).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from planner.errors import PlannerError
from planner.io import write_atomic
from planner.modules import LEVEL_KINDS, modules_at_level
from planner.search.budget import Budget, first_true, unreachable

SCORE_LIMIT = 5.0
# A threshold above every gate: every free entry reuses.
THETA_ALL_REUSE = 1.0 + 1e-9
REUSE_CODE = {"sublayer": "R", "block": "D"}
ROUTER_FILE = "router.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
CURVE_FILE = "training_curve.csv"


# --------------------------------------------------------------------------- which modules


def gated_modules(modules: Sequence[Any], level: str) -> list[str]:
    """Names of the modules a router at ``level`` (``sublayer`` or ``block``) gates, in forward order.

    ``modules`` are ``CacheableModule``-like objects (``.name``, ``.kind``), e.g. ``context.modules``."""
    if level not in LEVEL_KINDS:
        raise PlannerError(f"router level must be sublayer or block, got {level!r}")
    names = modules_at_level(modules, level)
    if not names:
        raise PlannerError(f"this model has no {level} modules to gate")
    return names


def every_other_step(steps: int, n_modules: int) -> torch.Tensor:
    """L2C's paper mode: the even steps (0, 2, ...) always compute, only odd steps may reuse."""
    fixed = torch.zeros(steps, n_modules, dtype=torch.bool)
    fixed[0::2] = True
    return fixed


# --------------------------------------------------------------------------- the router


class Router:
    """A table of raw scores ``[steps, modules]``; gates = sigmoid(score), fixed entries held at 1."""

    def __init__(self, modules: Sequence[str], steps: int, level: str, fixed: torch.Tensor | None = None,
                 init: float = 2.0, max_run: int | None = None):
        if level not in REUSE_CODE:
            raise PlannerError(f"router level must be sublayer or block, got {level!r}")
        if steps < 1 or not modules:
            raise PlannerError("a router needs at least one step and one module")
        self.modules = list(modules)
        self.steps = int(steps)
        self.level = level
        self.max_run = None if max_run is None else int(max_run)
        shape = (self.steps, len(self.modules))
        fixed = torch.zeros(shape, dtype=torch.bool) if fixed is None else fixed.clone().bool()
        if tuple(fixed.shape) != shape:
            raise PlannerError(f"fixed mask must have shape {list(shape)}, got {list(fixed.shape)}")
        fixed[0] = True  # nothing is cached before the first step
        self.fixed = fixed
        init = float(max(-SCORE_LIMIT, min(SCORE_LIMIT, init)))
        self.scores = torch.full(shape, init, dtype=torch.float32, requires_grad=True)

    def gates(self) -> torch.Tensor:
        """``sigmoid(scores)`` with fixed entries 1; differentiable in ``scores``."""
        return torch.where(self.fixed, torch.ones_like(self.scores), torch.sigmoid(self.scores))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the scores in ``[-5, 5]`` (after every optimizer step, as L2C does)."""
        self.scores.clamp_(-SCORE_LIMIT, SCORE_LIMIT)

    def hard_gates(self, theta: float) -> torch.Tensor:
        """0/1 gates: 1 where the hard plan computes (see :meth:`decisions`)."""
        return hard_gates(self.gates().detach(), theta, self.fixed, self.max_run)

    def decisions(self, theta: float) -> dict[str, str]:
        """The hard plan's decisions: per module one code string, ``C`` where gate >= ``theta``, else
        the level's reuse code (``R`` sub-layers, ``D`` blocks); the same on every CFG branch. With
        ``max_run`` a module computes after that many reuses in a row, whatever its gate says."""
        return decisions_from_gates(self.gates().detach(), self.modules, self.level, theta, self.fixed, self.max_run)

    def load_scores(self, scores: torch.Tensor) -> None:
        """Replace the scores in place (the tensor an optimizer holds stays the same object)."""
        if tuple(scores.shape) != tuple(self.scores.shape):
            raise PlannerError(f"router scores have shape {list(scores.shape)}, expected {list(self.scores.shape)}")
        with torch.no_grad():
            self.scores.copy_(scores)

    def meta(self) -> dict:
        """What identifies the table (saved with it): modules, steps, level."""
        return {"modules": self.modules, "steps": self.steps, "level": self.level, "max_run": self.max_run}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"scores": self.scores.detach().clone(), "fixed": self.fixed.to(torch.uint8)}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Router:
        """A router rebuilt from :meth:`tensors` and :meth:`meta`."""
        try:
            router = cls(meta["modules"], int(meta["steps"]), meta["level"], tensors["fixed"].bool(),
                         max_run=meta.get("max_run"))
            router.load_scores(tensors["scores"].float())
        except KeyError as e:
            raise PlannerError(f"saved router lacks {e.args[0]!r}") from None
        return router


def hard_gates(gates: torch.Tensor, theta: float, fixed: torch.Tensor | None = None,
               max_run: int | None = None) -> torch.Tensor:
    """Floats 0/1: 1 (compute) where ``gates >= theta``, where ``fixed``, at step 0, and (with ``max_run``)
    where a module has already reused ``max_run`` steps in a row."""
    keep = gates >= theta
    if fixed is not None:
        keep = keep | fixed
    keep[0] = True
    if max_run is not None:
        run = torch.zeros(keep.shape[1], dtype=torch.long)
        for t in range(keep.shape[0]):
            keep[t] |= run >= max_run
            run = torch.where(keep[t], torch.zeros_like(run), run + 1)
    return keep.to(gates.dtype)


def decisions_from_gates(gates: torch.Tensor, modules: Sequence[str], level: str, theta: float,
                         fixed: torch.Tensor | None = None, max_run: int | None = None) -> dict[str, str]:
    """See :meth:`Router.decisions`; ``gates`` is ``[steps, len(modules)]``. Step 0 always computes."""
    keep = hard_gates(gates, theta, fixed, max_run).bool()
    reuse = REUSE_CODE[level]
    return {m: "".join("C" if k else reuse for k in keep[:, j].tolist()) for j, m in enumerate(modules)}


# --------------------------------------------------------------------------- thresholds and budgets


def theta_candidates(gates: torch.Tensor, fixed: torch.Tensor | None = None) -> list[float]:
    """Thresholds from least to most reuse at which the hard plan changes: 0 (all compute), the
    midpoints between consecutive distinct free gate values, and 1.0 (every free entry reuses)."""
    free = gates.detach() if fixed is None else gates.detach()[~fixed]
    values = np.unique(free.double().numpy())
    mids = ((values[:-1] + values[1:]) / 2).tolist() if len(values) > 1 else []
    return [0.0, *mids, THETA_ALL_REUSE]


@dataclass
class Gates:
    """Gates of one training setting (e.g. one lambda) with what the plan needs to name them."""

    gates: torch.Tensor  # [steps, modules], detached
    modules: list[str]
    level: str
    fixed: torch.Tensor
    params: dict = field(default_factory=dict)  # lambda, iterations, ... for the plan's provenance
    max_run: int | None = None

    @classmethod
    def of(cls, router: Router, **params: Any) -> Gates:
        """A snapshot of ``router``'s current gates."""
        return cls(router.gates().detach().clone(), list(router.modules), router.level, router.fixed.clone(), params,
                   router.max_run)

    def decisions(self, theta: float) -> dict[str, str]:
        return decisions_from_gates(self.gates, self.modules, self.level, theta, self.fixed, self.max_run)

    def router(self, max_run: int | None = None) -> Router:
        """A router with these gates (scores = logit of the gates, clamped) and run cap ``max_run``: what is saved
        beside a plan, so that its ``decisions(theta)`` give the plan again."""
        router = Router(self.modules, self.gates.shape[0], self.level, self.fixed, max_run=max_run)
        router.load_scores(torch.logit(self.gates.double()).clamp(-5, 5).float())
        return router


def predicted_speedup(context, gates: Gates | Router, theta: float) -> float:
    """The latency model's speedup of the hard plan of ``gates`` at ``theta``."""
    return context.predict(context.plan(gates.decisions(theta)))[0]


def theta_for_speedup(context, gates: Gates | Router, speedup: float) -> tuple[float, float] | None:
    """``(theta, predicted speedup)``: the first candidate threshold (least reuse) whose hard plan
    meets ``speedup``, by bisection (the speedup grows with theta up to the executor's small hook
    costs, so the result meets the budget but may not be the very least theta); ``None`` if even
    the largest misses."""
    g = gates if isinstance(gates, Gates) else Gates.of(gates)
    thetas = theta_candidates(g.gates, g.fixed)
    target = Budget(speedup=speedup)
    at = functools.cache(lambda i: predicted_speedup(context, g, thetas[i]))
    i = first_true(len(thetas), lambda j: target.speed_met(at(j)))
    return None if i is None else (thetas[i], at(i))


def max_speedup(context, gates: Gates | Router) -> float:
    """The predicted speedup when every free entry reuses: no threshold does better."""
    return predicted_speedup(context, gates, THETA_ALL_REUSE)


def router_reach(context, router: Router, max_runs: Sequence[int | None] | None = None) -> float:
    """The fastest predicted speedup any hard plan of ``router``'s shape can have, whatever training makes
    of its gates: every free entry reusing, under the least limiting of the run caps ``max_runs`` (``None``:
    the router's own cap)."""
    g = Gates.of(router)
    caps = [router.max_run] if max_runs is None else list(max_runs)
    return max(max_speedup(context, dataclasses.replace(g, max_run=cap)) for cap in caps)


def check_reach(context, budget, router: Router, max_runs: Sequence[int | None] | None, how: str) -> None:
    """PlannerError, before any training, when no plan of ``router``'s shape reaches the speed budget."""
    if budget.speedup is None:
        return
    reach = router_reach(context, router, max_runs)
    if not budget.speed_met(reach):
        raise PlannerError(f"budget {budget.label()} cannot be met: the fastest plan {how} predicts {reach:.2f}x "
                           f"(every free gate reusing; the model's fastest plan: {context.max_speedup():.2f}x), "
                           "and no training changes that")


def _theta_for_error(context, g: Gates, max_error: float, evaluations: int = 8):
    """``(theta, evaluation)`` of the fastest plan found within ``max_error``, ``None`` when none is:
    a bisection for the largest threshold (most reuse) that keeps the calibration error within,
    ``evaluations`` calibration runs at most. The fastest of the plans it tried within the error is
    kept, not the last: more reuse is not always faster (each hooked module pays the hook's cost
    at every step)."""
    thetas = theta_candidates(g.gates, g.fixed)
    within = []
    lo, hi = 0, len(thetas) - 1
    for _ in range(evaluations):
        if lo > hi:
            break
        mid = (lo + hi + 1) // 2
        evaluation = context.evaluate(context.plan(g.decisions(thetas[mid])))
        if evaluation.error <= max_error:
            within.append((thetas[mid], evaluation))
            lo = mid + 1
        else:
            hi = mid - 1
    return max(within, key=lambda r: r[1].predicted_speedup, default=None)


def choose_plan(context, budget, candidates: Sequence[Gates], strategy: str, how: str = "of a learned router",
                max_runs: Sequence[int | None] | None = None):
    """The best hard plan over ``candidates`` (see the module docstring); PlannerError when none meets the budget.

    With ``max_runs`` every candidate is also tried with each of these caps on consecutive reuses
    (``None``: no cap) in place of its own. Each candidate's params, plus ``theta`` and ``max_run``,
    go into the plan's provenance."""
    if max_runs is not None:
        candidates = [dataclasses.replace(g, max_run=r, params={**g.params, "max_run": r})
                      for g in candidates for r in max_runs]
    results = []  # (theta, evaluation, candidate)
    best_max = 0.0
    for g in candidates:
        if budget.speedup is not None:
            found = theta_for_speedup(context, g, budget.speedup)
            if found is None:
                best_max = max(best_max, max_speedup(context, g))
                continue
            theta = found[0]
            results.append((theta, context.evaluate(context.plan(g.decisions(theta))), g))
        else:
            found = _theta_for_error(context, g, budget.max_error)
            if found is not None:
                results.append((*found, g))
    if not results:
        if budget.speedup is not None:
            raise unreachable(budget, best_max, how)
        raise PlannerError(f"no plan {how} keeps the calibration error within {budget.max_error:g}")
    if budget.speedup is not None:
        theta, evaluation, g = min(results, key=lambda r: r[1].error)
    else:
        theta, evaluation, g = max(results, key=lambda r: r[1].predicted_speedup)
    params = {**g.params, "theta": float(theta), "max_run": g.max_run}
    return context.plan(g.decisions(theta), strategy=strategy, params=params, evaluation=evaluation)


def plan_at_theta(context, budget, candidates: Sequence[Gates], theta: float, strategy: str, how: str):
    """The least-error hard plan at a fixed ``theta`` over ``candidates`` (each evaluated on the calibration
    inputs); PlannerError when none meets ``budget``. The candidate's params plus ``theta`` go into the provenance."""
    best = None
    for g in candidates:
        evaluation = context.evaluate(context.plan(g.decisions(theta)))
        if budget.met(evaluation.predicted_speedup, evaluation.error) and (best is None or evaluation.error < best[1].error):
            best = (g, evaluation)
    if best is None:
        raise PlannerError(f"no plan {how} at theta {theta:g} meets {budget.label()}: leave theta out to search it")
    g, evaluation = best
    return context.plan(g.decisions(theta), strategy=strategy, params={**g.params, "theta": theta}, evaluation=evaluation)


# --------------------------------------------------------------------------- training helpers


def gate_costs(latency, modules: Sequence[str]) -> torch.Tensor:
    """Each module's compute time in the latency model (a block with everything inside it),
    normalised to mean 1: weights for a penalty that counts time saved rather than modules."""
    inside = latency.compute_s
    missing = [m for m in modules if m not in inside]
    if missing:
        raise PlannerError(f"the profile has no cost for {missing[0]!r}")
    cost = torch.tensor([inside[m] for m in modules], dtype=torch.float32)
    return cost / cost.mean() if cost.mean() > 0 else torch.ones_like(cost)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with ``requires_grad`` off on every parameter inside, restored afterwards."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


@dataclass
class StepCalls:
    """The transformer calls of a full-compute run, per step: inputs (``args``, ``kwargs``) and outputs.

    The inputs hold the x_t of the full trajectory; the outputs are the teacher's answers to them."""

    calls: list[list[tuple[tuple, dict]]]  # [step][call] -> (args, kwargs)
    outputs: list[list[torch.Tensor]]  # [step][call] -> first tensor of the output

    @property
    def steps(self) -> int:
        return len(self.calls)

    def replay(self, transformer: torch.nn.Module, step: int) -> list[torch.Tensor]:
        """Call ``transformer`` on step ``step``'s recorded inputs (every call of the step, in order);
        the first tensor of each output. Under a plan handle, wrap it in ``handle.at_step(step)``."""
        from planner.executor.tree import first_tensor

        return [first_tensor(transformer(*args, **kwargs)) for args, kwargs in self.calls[step]]

    def teacher(self, step: int) -> list[torch.Tensor]:
        return self.outputs[step]


def record_calls(runner, conditions: list[Any], seeds: list[int], sampler, calls_per_step: int) -> StepCalls:
    """Run ``conditions`` x ``seeds`` once at full compute and keep every transformer call (see
    :class:`StepCalls`). ``calls_per_step`` is 2 for separate CFG calls, else 1."""
    from planner.executor.tree import first_tensor

    def detach(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, (tuple, list)):
            return type(x)(detach(v) for v in x)
        if isinstance(x, dict):
            return {k: detach(v) for k, v in x.items()}
        return x

    flat: list[tuple[tuple, dict]] = []
    outs: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        flat.append((detach(args), detach(kwargs)))
        outs.append(first_tensor(output).detach().clone())

    handle = runner.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        runner.run(conditions, seeds, sampler, output="latent")
    finally:
        handle.remove()
    steps = runner.resolve(sampler).steps
    if len(flat) != steps * calls_per_step:
        raise PlannerError(f"expected {steps * calls_per_step} transformer calls for {steps} steps, saw {len(flat)}")
    group = [list(range(s * calls_per_step, (s + 1) * calls_per_step)) for s in range(steps)]
    return StepCalls([[flat[i] for i in g] for g in group], [[outs[i] for i in g] for g in group])


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """One safetensors file with ``tensors`` and ``meta`` (JSON, under the metadata key ``meta``), atomically."""
    from safetensors.torch import save

    from planner.io import json_safe

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    text = json.dumps(json_safe(meta), allow_nan=False)  # strict JSON: a NaN loss is written as "nan"
    # bytes into the planner's own temporary file: safetensors' save_file makes its file 0600, unlike every
    # other artifact (the umask decides)
    data = save(clean, metadata={"meta": text})
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, meta)`` from :func:`save_checkpoint`; PlannerError (one line) on a missing or bad file."""
    from safetensors import SafetensorError, safe_open

    from planner.artifact import MAX_JSON_DEPTH, max_nesting
    from planner.io import MAX_ARTIFACT_BYTES

    path = Path(path)
    if not path.is_file():
        raise PlannerError(f"no checkpoint at {path}")
    if path.stat().st_size > MAX_ARTIFACT_BYTES:
        raise PlannerError(f"{path}: larger than any checkpoint ({MAX_ARTIFACT_BYTES // 2**20} MiB at most)")
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("meta", "null")
            if max_nesting(text) > MAX_JSON_DEPTH:
                raise ValueError(f"metadata nested more than {MAX_JSON_DEPTH} levels deep")
            meta = json.loads(text)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a file handle, not a dict)
    except (SafetensorError, OSError, ValueError) as e:  # a damaged header or metadata
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise PlannerError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(meta, dict):
        raise PlannerError(f"checkpoint {path} has no metadata record")
    return tensors, meta


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as ``({name: tensor}, json-able meta)``: per-parameter state tensors under
    ``{prefix}.{index}.{key}``, scalar state and param-group hyper-parameters in the meta."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"scalars": scalars, "param_groups": groups, "indices": [int(i) for i in sd["state"]]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                      prefix: str = "optim") -> None:
    """Inverse of :func:`optimizer_tensors` onto an optimizer built over the same parameters."""
    state: dict[int, dict[str, Any]] = {}
    for index in meta["indices"]:
        entry = dict(meta["scalars"].get(str(index), {}))
        head = f"{prefix}.{index}."
        entry.update({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
        state[int(index)] = entry
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise PlannerError(f"checkpoint's optimizer state does not fit: {e}") from None


def save_router(folder: str | Path, router: Router, meta: dict | None = None) -> Path:
    """``folder/router.safetensors``: the score table with the router's identity and ``meta``."""
    return save_checkpoint(Path(folder) / ROUTER_FILE, router.tensors(), {**router.meta(), **(meta or {})})


def load_router(path: str | Path) -> tuple[Router, dict]:
    """``(router, meta)`` from :func:`save_router` (a file, or a folder holding ``router.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / ROUTER_FILE
    tensors, meta = load_checkpoint(path)
    return Router.from_saved(tensors, meta), meta


# --------------------------------------------------------------------------- curve and progress


@dataclass
class TrainingCurve:
    """Rows of training figures (one dict each, e.g. iteration, lambda, loss, mse, gate mean,
    predicted speedup, seconds); :meth:`save` writes them as CSV (and a PNG of loss and speedup)."""

    rows: list[dict] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        self.rows.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})

    def save(self, folder: str | Path, plot: bool = True) -> Path:
        """``folder/training_curve.csv`` (and ``training_curve.png`` when ``plot``), atomically."""
        import pandas as pd

        path = Path(folder) / CURVE_FILE
        frame = pd.DataFrame(self.rows)
        write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
        if plot and len(frame) and {"iteration", "loss"} <= set(frame.columns):
            self._plot(frame, path.with_suffix(".png"))
        return path

    @staticmethod
    def _plot(frame, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.plot(frame["iteration"], frame["loss"], lw=1, label="loss")
        if "mse" in frame:
            ax.plot(frame["iteration"], frame["mse"], lw=1, label="MSE (relative)")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        if "predicted_speedup" in frame:
            right = ax.twinx()
            right.plot(frame["iteration"], frame["predicted_speedup"], color="tab:red", lw=1, label="predicted speedup")
            right.set_ylabel("predicted speedup (x)")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    """The trainers' tqdm bar (set its postfix to loss and predicted speedup as training goes)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
