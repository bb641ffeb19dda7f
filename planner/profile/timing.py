"""The cost pass: latency of every cacheable module, of the reuse operations, of everything outside
the cached modules, and FLOPs (fvcore). Runs apart from the similarity pass, with no watching hooks.

How latency is measured:

* **modules, in context**: full pipeline runs with a stopwatch hook around every module call
  (``perf_counter`` on CPU, a pair of CUDA events on a GPU), after a warm-up run; the module's
  latency is the median over all its calls (steps x runs). With batched CFG the same is done on
  runs with half the samples, which gives every call one branch's batch: what a plan computing one
  branch pays. (Replaying a module alone on captured inputs, :func:`time_modules`, is kept as the
  fallback for an odd sample count; on a shared CPU it proved far noisier than in-context timing.)
* **fixed costs**, paired within the same runs: a transformer call minus its blocks, a step minus
  its transformer calls, a run minus its loop; medians of those differences.
* **reuse operations** (copy, add, extrapolate, CFG-half copy) on each module's output size, and the
  per-call overhead of the executor's hook (:func:`executor_hook_overhead`).
* **plain runs** with no hook at all, interleaved with the timed ones, to check the model against.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from diffusers.hooks import ModelHook
from torch.utils._pytree import tree_map

from planner.cfg import COND, CfgLayout
from planner.executor.hooks import FORECAST2_LIMIT, limited_forecast2
from planner.modules import LEVEL_KINDS, CacheableModule
from planner.plan import COMPUTE
from planner.profile.capture import (
    StepTracker,
    attach,
    detach_hooks,
    output_tensors,
    resolve_modules,
)
# The cost table's column for each reuse action of planner.plan.ACTION_CODES.
REUSE_COLUMNS = {"R": "reuse_ms", "D": "reuse_residual_ms", "F": "forecast_ms", "Q": "forecast2_ms",
                 "L": "forecast2_limited_ms", "S": "share_cfg_ms"}
# Columns profiles made before them lack: the column whose cost stands in, times a factor. The timed
# first-order forecast is two tensor operations (a subtraction and an addition); the second-order one
# weighs three cached outputs, six operations (three products, three sums), so three times as many.
# Small outputs cost per operation, not per element: on digits-dit's block outputs (16k elements,
# one thread) the measured ratio was 4.9, on large ones it tends to the operation count's 3. The limited
# second-order forecast adds the first-order term, two per-sample norms and the cut: about 2.5 times as
# many operations as the plain one. Stand-ins chain (forecast2_limited_ms -> forecast2_ms -> forecast_ms).
REUSE_FALLBACKS = {"forecast2_ms": ("forecast_ms", 3.0), "forecast2_limited_ms": ("forecast2_ms", 2.5)}


@dataclass
class TimingConfig:
    """How hard to time: warm-up calls, timed samples per module, rounds of full runs, CPU sample
    length, and how much slower than the fastest a round may be and still count."""

    warmup: int = 3
    repeats: int = 15
    run_repeats: int = 5
    min_sample_s: float = 1e-3
    quiet_tolerance: float = 0.1  # rounds slower than the fastest by more than this are left out


@dataclass
class Measurement:
    """Median and inter-quartile range of repeated timings, in seconds."""

    median: float
    iqr: float


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block, as ``timeit`` does: in a process holding
    many objects (a test session, a notebook) one full collection takes hundreds of ms, and one
    landing in a timed run skews it by that much (seen: 0.45 s counted as the run's fixed cost)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, cfg: TimingConfig) -> Measurement:
    """Median time of one ``fn()`` after ``cfg.warmup`` warm-up calls.

    CPU: ``cfg.repeats`` samples, each a loop of calls lasting about ``cfg.min_sample_s`` (so the
    timer's resolution and per-sample noise do not dominate sub-millisecond modules). GPU: one call
    between two CUDA events per sample, synchronised once at the end.
    """
    with torch.no_grad():
        for _ in range(cfg.warmup):
            fn()
        if device.type == "cuda":
            _sync(device)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(cfg.repeats)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            _sync(device)
            samples = [s.elapsed_time(e) / 1e3 for s, e in events]
        else:
            t0 = time.perf_counter()
            fn()
            one = max(time.perf_counter() - t0, 1e-7)
            inner = int(max(1, min(1000, cfg.min_sample_s / one)))
            samples = []
            for _ in range(cfg.repeats):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples.append((time.perf_counter() - t0) / inner)
    q1, med, q3 = np.percentile(samples, [25, 50, 75])
    return Measurement(float(med), float(q3 - q1))


def call_signature(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What decides a module call's cost and output shapes: the module's class and parameter shapes,
    and the shapes and dtypes of its tensor arguments (plain values as they are)."""
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten((args, kwargs))
    sig = tuple(
        (tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor)
        else (type(x).__name__, x if isinstance(x, (int, float, str, bool, type(None))) else None)
        for x in leaves
    )
    params = tuple((name, tuple(p.shape), str(p.dtype)) for name, p in module.named_parameters())
    return type(module), params, str(spec), sig


class _Capture(ModelHook):
    """Clones the inputs (and output) of one module's call at the chosen step and cond branch.

    With a shared ``seen`` dict, a call whose :func:`call_signature` an earlier module's capture
    already has is not cloned: it points at that capture (``same_as``). Twenty-eight identical blocks
    then hold one copy of a block's inputs, not twenty-eight.
    """

    def __init__(self, tracker: StepTracker, step: int, keep_output: bool = True, seen: dict | None = None):
        super().__init__()
        self.tracker, self.step, self.keep_output = tracker, step, keep_output
        self.args = self.kwargs = self.output = None
        self.same_as: "_Capture | None" = None
        self.seen = seen
        self._armed = False

    def pre_forward(self, module, *args, **kwargs):
        self._armed = (self.tracker.step == self.step and self.tracker.branch in (None, COND)
                       and self.args is None and self.same_as is None)
        if self._armed and self.seen is not None:
            key = call_signature(module, args, kwargs)
            if key in self.seen:
                self.same_as, self._armed = self.seen[key], False
            else:
                self.seen[key] = self
        if self._armed:
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.args, self.kwargs = tree_map(clone, args), tree_map(clone, dict(kwargs))
        return args, kwargs

    def post_forward(self, module, output):
        if self._armed and self.keep_output:
            self.output = [t.detach().clone() for t in output_tensors(output)]
        self._armed = False
        return output


@dataclass
class Captured:
    """What one module got and gave at the captured step (full batch of one call)."""

    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]


def capture_inputs(runner, modules: list[CacheableModule], sampler, conds, seeds,
                   dedupe: bool = True) -> tuple[list[Captured], Captured]:
    """One full run that records every module's call at the middle step; also serves as warm-up.

    Returns the captures of ``modules`` (in order) and of the transformer call itself. With
    ``dedupe`` (the default) modules whose calls have the same :func:`call_signature` share one
    :class:`Captured` object (the first such module's inputs and outputs): what is held is one call
    per distinct kind of module, not one per module, and every cost read off a capture (replay time,
    reuse-op time, output size) is the same for calls of one signature.
    """
    layout = runner.cfg_layout(sampler)
    transformer = runner.transformer
    targets = resolve_modules(transformer, modules)
    tracker = StepTracker(layout)
    step = sampler.steps // 2
    seen: dict | None = {} if dedupe else None
    caps = [_Capture(tracker, _middle_step(runner, sampler, m.name, step), seen=seen) for m in modules]
    top = _Capture(tracker, step, keep_output=False)
    hooks = [(mod, cap, f"capture.{m.name}") for m, mod, cap in zip(modules, targets, caps)]
    # The tracker must be the outermost hook on the transformer, so it is attached last.
    hooks += [(transformer, top, "capture"), (transformer, tracker, "step")]
    hs = attach(transformer, hooks)
    try:
        runner.run(conds, seeds, sampler, output="latent")
    finally:
        detach_hooks(transformer, hs)
    missing = [m.name for m, c in zip(modules, caps) if c.args is None and c.same_as is None]
    if missing or top.args is None:
        from planner.profile.artifact import ProfileError

        raise ProfileError(f"modules never called at step {step}: {', '.join(missing[:5]) or '<transformer>'}")
    made: dict[int, Captured] = {}
    out = []
    for c in caps:
        rep = c.same_as or c
        if id(rep) not in made:
            made[id(rep)] = Captured(rep.args, rep.kwargs, rep.output or [])
        out.append(made[id(rep)])
    return out, Captured(top.args, top.kwargs, [])


def _middle_step(runner, sampler, module: str, default: int) -> int:
    """The step a module's call is captured at: the run's middle step, or with several transformers (Wan 2.2)
    the middle one of the steps the module's transformer runs."""
    steps = runner.component_steps(sampler)
    if not steps:
        return default
    from planner.plan.components import module_steps

    own = module_steps(steps, module) or [default]
    return own[len(own) // 2]


def half_batch(obj: Any, batch: int) -> Any:
    """``obj`` with every tensor whose first dimension is ``batch`` cut to its first half."""
    return tree_map(lambda x: x[: batch // 2] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x, obj)


def time_modules(modules: list[CacheableModule], targets: list[torch.nn.Module], caps: list[Captured], layout: str,
                 device: torch.device, cfg: TimingConfig, progress=None) -> tuple[list[dict], list[str]]:
    """Replay-time every module at full batch and (batched CFG) at half batch; returns one dict per
    module with ``latency_ms``, ``latency_iqr_ms``, ``latency_half_ms`` and a list of warnings."""
    rows, warnings = [], []
    for m, mod, cap in zip(modules, targets, caps):
        full = time_call(lambda: mod(*cap.args, **cap.kwargs), device, cfg)
        row = {"latency_ms": full.median * 1e3, "latency_iqr_ms": full.iqr * 1e3, "latency_half_ms": full.median * 1e3}
        batch = cap.outputs[0].shape[0] if cap.outputs else None
        if CfgLayout(layout).batched and batch and batch % 2 == 0:
            args, kwargs = half_batch(cap.args, batch), half_batch(cap.kwargs, batch)
            try:
                half = time_call(lambda: mod(*args, **kwargs), device, cfg)
                row["latency_half_ms"] = half.median * 1e3
            except Exception as exc:  # a module whose inputs cannot be cut by batch: assume half the time
                row["latency_half_ms"] = full.median * 1e3 / 2
                warnings.append(f"{m.name}: half-batch replay failed ({type(exc).__name__}); half-batch time estimated as full/2")
        rows.append(row)
        if progress is not None:
            progress.update(1)
    return rows, warnings


class _Stopwatch(ModelHook):
    """Marks the start and end of every call of one module (``perf_counter`` on CPU, CUDA events on a GPU)."""

    def __init__(self, clock: "_Clock"):
        super().__init__()
        self.clock = clock
        self.marks: list[tuple] = []
        self._start = None

    def pre_forward(self, module, *args, **kwargs):
        self._start = self.clock.mark()
        return args, kwargs

    def post_forward(self, module, output):
        self.marks.append((self._start, self.clock.mark()))
        return output


@dataclass
class InContext:
    """Timings from runs with a stopwatch on every module and on the transformer, seconds.

    ``modules[i]`` holds every call of module ``i``. The fixed costs are paired within a call, step
    or run (a transformer call minus its blocks, a step minus its calls, a run minus its loop), so a
    burst of machine load inflates both sides of a difference alike instead of skewing it.
    """

    modules: list[list[float]]
    call: list[float]
    call_fixed: list[float]
    step: list[float]
    step_fixed: list[float]
    run: list[float]
    run_fixed: list[float]

    @classmethod
    def empty(cls, n_modules: int) -> "InContext":
        return cls([[] for _ in range(n_modules)], [], [], [], [], [], [])

    def extend(self, other: "InContext") -> None:
        """Append another set of runs' timings."""
        for mine, theirs in zip(self.modules, other.modules):
            mine += theirs
        for key in ("call", "call_fixed", "step", "step_fixed", "run", "run_fixed"):
            getattr(self, key).extend(getattr(other, key))


def time_in_context(runner, modules: list[CacheableModule], sampler, conds, seeds, cfg: TimingConfig) -> InContext:
    """Time every module inside ``cfg.run_repeats`` real runs (the caller has warmed the pipeline up).

    A block's time includes its children's (and their few microseconds of hook overhead).
    """
    layout = runner.cfg_layout(sampler)
    transformer = runner.transformer
    device = runner.device
    clock = _Clock(device)
    targets = resolve_modules(transformer, modules)
    block_idx = [i for i, m in enumerate(modules) if m.kind == "block"]
    out = InContext([[] for _ in modules], [], [], [], [], [], [])
    for _ in range(cfg.run_repeats):
        watches = [_Stopwatch(clock) for _ in modules]
        starts, ends, step_of = [], [], []
        tracker = StepTracker(
            layout,
            on_call=lambda tr: (starts.append(clock.mark()), step_of.append(tr.step)),
            on_return=lambda tr: ends.append(clock.mark()),
        )
        hooks = [(mod, w, f"stopwatch.{m.name}") for m, mod, w in zip(modules, targets, watches)]
        hs = attach(transformer, hooks + [(transformer, tracker, "clock")])
        try:
            _sync(device)
            t0 = time.perf_counter()
            runner.run(conds, seeds, sampler, output="image")
            _sync(device)
            total = time.perf_counter() - t0
        finally:
            detach_hooks(transformer, hs)
        per_module = [[clock.seconds(a, b) for a, b in w.marks] for w in watches]
        for i, times in enumerate(per_module):
            out.modules[i] += times
        calls = [clock.seconds(a, b) for a, b in zip(starts, ends)]
        out.call += calls
        n_calls = len(calls)
        if block_idx and all(len(per_module[i]) == n_calls for i in block_idx):
            out.call_fixed += [c - sum(per_module[i][j] for i in block_idx) for j, c in enumerate(calls)]
        first = {}
        for j, st in enumerate(step_of):
            first.setdefault(st, j)
        steps = sorted(first)
        for a_, b_ in zip(steps, steps[1:]):
            interval = clock.seconds(starts[first[a_]], starts[first[b_]])
            inside = sum(calls[first[a_]:first[b_]])
            out.step.append(interval)
            out.step_fixed.append(interval - inside)
        if calls:
            span = clock.seconds(starts[0], ends[-1])
            out.run.append(total)
            out.run_fixed.append(total - span - (median(out.step_fixed) if out.step_fixed else 0.0))
    return out


def time_reuse_ops(caps: list[Captured], layout: str, device: torch.device, cfg: TimingConfig) -> list[dict]:
    """Cost of the reuse operations on each module's output size (full batch of one call), in ms.

    ``R`` copies the cached output, ``D`` adds a cached residual to the fresh input, ``F`` extrapolates
    from two cached outputs, ``Q`` weighs three (the executor's second-order forecast), ``L`` is the
    executor's limited second-order forecast of three, ``S`` copies one
    CFG half onto the other. Modules with equal output
    shapes share one measurement.
    """
    light = TimingConfig(warmup=2, repeats=max(5, cfg.repeats // 2), run_repeats=cfg.run_repeats, min_sample_s=cfg.min_sample_s)
    memo: dict[tuple, dict] = {}
    rows = []
    for cap in caps:
        outs = cap.outputs
        key = tuple((tuple(t.shape), t.dtype) for t in outs)
        if key not in memo:
            if not outs:
                memo[key] = {col: 0.0 for col in REUSE_COLUMNS.values()}
            else:
                prev = [t * 0.5 for t in outs]
                older = [t * 0.25 for t in outs]
                weights = (0.3, -1.1, 1.8)  # what the executor's Lagrange weights look like: any three floats
                ops = {
                    "R": lambda: [t.clone() for t in outs],
                    "D": lambda: [torch.add(t, p) for t, p in zip(outs, prev)],
                    "F": lambda: [torch.add(t, torch.sub(t, p)) for t, p in zip(outs, prev)],
                    "Q": lambda: [sum(w * x for w, x in zip(weights, xs)) for xs in zip(older, prev, outs)],
                    "L": lambda: [limited_forecast2(xs, weights, 0.5, FORECAST2_LIMIT) for xs in zip(older, prev, outs)],
                    "S": (lambda: [torch.cat([h, h]) for h in (t[: t.shape[0] // 2] for t in outs)])
                    if CfgLayout(layout).batched
                    else (lambda: [t.clone() for t in outs]),
                }
                memo[key] = {REUSE_COLUMNS[c]: time_call(fn, device, light).median * 1e3 for c, fn in ops.items()}
        rows.append({**memo[key], "out_numel": int(sum(t.numel() for t in outs))})
    return rows


class _Nop(ModelHook):
    pass


def time_hook_overhead(device: torch.device, cfg: TimingConfig) -> float:
    """Extra time, in ms, one pass-through diffusers hook adds to a module call (what an executor's
    hook costs even when it computes)."""
    from planner.profile.capture import HookSet

    mod = torch.nn.Identity()
    x = torch.zeros(1, device=device)
    bare = time_call(lambda: mod(x), device, cfg).median
    hs = HookSet()
    hs.add(mod, _Nop(), "nop")
    try:
        hooked = time_call(lambda: mod(x), device, cfg).median
    finally:
        hs.remove()
    return max(0.0, hooked - bare) * 1e3


class _Clock:
    """Timestamps that mean the same on CPU (``perf_counter``) and GPU (CUDA events)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            _sync(self.device)
            return a.elapsed_time(b) / 1e3
        return b - a


@dataclass
class RunTimes:
    """Totals of full runs with no hook at all (``clean``) and without VAE decode (``latent``), seconds."""

    clean: list[float] = field(default_factory=list)
    latent: list[float] = field(default_factory=list)

    def extend(self, other: "RunTimes") -> None:
        """Append another set of runs' totals."""
        self.clean += other.clean
        self.latent += other.latent


def time_runs(runner, sampler, conds, seeds, cfg: TimingConfig, with_latent: bool) -> RunTimes:
    """Time ``cfg.run_repeats`` full runs with no hook at all (what the latency model is checked
    against); ``with_latent`` adds as many runs that stop before the VAE decode."""
    device = runner.device
    out = RunTimes()

    def timed(output: str) -> float:
        _sync(device)
        t0 = time.perf_counter()
        runner.run(conds, seeds, sampler, output=output)
        _sync(device)
        return time.perf_counter() - t0

    for _ in range(cfg.run_repeats):
        out.clean.append(timed("image"))
        if with_latent:
            out.latent.append(timed("latent"))
    return out




# Runs of the executor's hook-overhead calibration, every block and sub-layer hooked in each.
EXECUTOR_ROUNDS = 2


class _HookCost:
    """One module's calls timed from both sides of the executor's hook: ``pairs`` holds, per call that
    reached the module's own forward, the marks outside the hook and those inside it."""

    def __init__(self, clock: "_Clock"):
        self.clock = clock
        self.inside: tuple | None = None
        self.pairs: list[tuple[tuple, tuple]] = []

    def hooks(self) -> tuple[ModelHook, ModelHook]:
        """The stopwatch to attach before the executor's hook (inside it) and the one to attach after."""
        return _InsideWatch(self), _OutsideWatch(self)

    def overheads(self) -> list[float]:
        """Per paired call, seconds outside minus seconds inside: what the hook added to that call."""
        seconds = self.clock.seconds
        return [seconds(*out) - seconds(*inside) for out, inside in self.pairs]


class _InsideWatch(ModelHook):
    """Marks the start and end of the module's own forward; the end hands the pair to the call's cost."""

    def __init__(self, cost: _HookCost):
        super().__init__()
        self.cost = cost
        self._start = None

    def pre_forward(self, module, *args, **kwargs):
        self._start = self.cost.clock.mark()
        return args, kwargs

    def post_forward(self, module, output):
        self.cost.inside = (self._start, self.cost.clock.mark())
        return output


class _OutsideWatch(_InsideWatch):
    """Marks the whole hooked call, and pairs it with the inside marks when the module's forward ran."""

    def pre_forward(self, module, *args, **kwargs):
        self.cost.inside = None
        return super().pre_forward(module, *args, **kwargs)

    def post_forward(self, module, output):
        end = self.cost.clock.mark()
        if self.cost.inside is not None:  # a reuse never reaches the module: nothing to pair
            self.cost.pairs.append(((self._start, end), self.cost.inside))
        return output


def executor_hook_overhead(runner, modules: list[CacheableModule], sampler, conds, seeds,
                           rounds: int = EXECUTOR_ROUNDS) -> tuple[dict[str, float], list[str]]:
    """Per-call overhead, in ms, of ``planner.executor``'s cache hook, per group (``block``, ``sublayer``).

    Every module of both groups is hooked by a plan that reuses only at its last step, and carries one
    stopwatch inside the executor's hook (around its own forward) and one outside it. A computed call's
    overhead is its time outside minus its time inside: the same call timed twice, so the module's own
    time, and the load that slows it, cancel (they did not when separate hooked and plain calls of a large
    module were compared on a shared machine: docs/profiles.md). A module's figure
    is the median over its calls, the group's the median over its modules. Returns ``({}, [reason])``
    when the executor cannot run the model.
    """
    from planner.executor import apply_plan
    from planner.plan import plan_for_runner
    transformer = runner.transformer
    clock = _Clock(runner.device)
    targets = resolve_modules(transformer, modules)
    if sampler.steps < 2:
        return {}, []
    own = _own_steps(runner, sampler, modules)  # with two transformers (Wan 2.2) each module's own steps
    leveled = {kind for group in LEVEL_KINDS.values() for kind in group}
    idx = [i for i, m in enumerate(modules) if m.kind in leveled and len(own[i]) >= 2]
    if not idx:
        return {}, []
    costs = {i: _HookCost(clock) for i in idx}
    watches = {i: costs[i].hooks() for i in idx}
    try:
        plan = plan_for_runner(runner, sampler).with_decisions(
            {modules[i].name: "".join("R" if k == own[i][-1] else COMPUTE for k in range(sampler.steps)) for i in idx})
        with contextlib.ExitStack() as stack:
            inside = attach(transformer, [(targets[i], watches[i][0], f"stopwatch.inside.{modules[i].name}") for i in idx])
            stack.callback(detach_hooks, transformer, inside)
            stack.enter_context(apply_plan(runner, plan))
            # attached after the executor's hooks, so these sit outside them
            outside = attach(transformer, [(targets[i], watches[i][1], f"stopwatch.outside.{modules[i].name}") for i in idx])
            stack.callback(detach_hooks, transformer, outside)
            for _ in range(rounds):
                runner.run(conds, seeds, sampler, output="latent")
    except Exception as exc:  # the executor cannot run this model: keep the bare-hook estimate
        return {}, [f"executor calibration failed ({type(exc).__name__}: {str(exc)[:120]}); executor hook overhead estimated by a bare diffusers hook"]
    out = {}
    for group, kinds in LEVEL_KINDS.items():
        per_module = [median(costs[i].overheads()) for i in idx if modules[i].kind in kinds and costs[i].pairs]
        if per_module:
            out[group] = median(per_module) * 1e3
    return out, []


def _own_steps(runner, sampler, modules: list[CacheableModule]) -> list[list[int]]:
    """The steps each module runs at: all of them, or with several transformers its transformer's."""
    from planner.plan.components import module_steps

    comps = runner.component_steps(sampler)
    every = list(range(sampler.steps))
    return [(module_steps(comps, m.name) if comps else None) or every for m in modules]


def _sdpa_flops(inputs, outputs):
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = int(np.prod(q[:-2]))
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])  # QK^T and AV, multiply-adds as fvcore counts them


def module_flops(transformer: torch.nn.Module, call: Captured, names: Sequence[str]) -> tuple[dict[str, float], float, str | None]:
    """fvcore FLOP counts (one multiply-add = 1, fvcore's convention) of each named module and of the
    whole transformer for the captured call; ``({}, nan, reason)`` when tracing fails. For a TransformerPair
    each transformer is counted on the captured call (its inputs fit them all) and the total is their mean:
    one of them runs per call."""
    comps = getattr(transformer, "component_names", None)
    if comps:
        from planner.modules import cacheable_modules
        from planner.plan.components import prefixed

        flops: dict[str, float] = {}
        totals = []
        for c in comps:
            inner = [m.name for m in cacheable_modules(transformer.component(c))]
            own = {prefixed(c, n): n for n in inner if prefixed(c, n) in set(names)}
            counted, total, why = module_flops(transformer.component(c), call, list(own.values()))
            if why:
                return {}, float("nan"), why
            flops.update({full: counted[name] for full, name in own.items()})
            totals.append(total)
        return flops, sum(totals) / len(totals), None
    import warnings as _w

    try:
        with _w.catch_warnings():
            _w.simplefilter("ignore")  # fvcore's import calls the deprecated torch.jit.script
            from fvcore.nn import FlopCountAnalysis
    except ImportError:  # pragma: no cover - fvcore is a dependency
        return {}, float("nan"), "fvcore is not installed"

    tensor_args = [i for i, a in enumerate(call.args) if isinstance(a, torch.Tensor)]
    tensor_kwargs = [k for k, v in call.kwargs.items() if isinstance(v, torch.Tensor)]

    class _Call(torch.nn.Module):
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, *tensors):
            args = list(call.args)
            for i, pos in enumerate(tensor_args):
                args[pos] = tensors[i]
            kwargs = dict(call.kwargs)
            for j, key in enumerate(tensor_kwargs):
                kwargs[key] = tensors[len(tensor_args) + j]
            kwargs["return_dict"] = False
            return output_tensors(self.t(*args, **kwargs))[0]

    inputs = tuple(call.args[i] for i in tensor_args) + tuple(call.kwargs[k] for k in tensor_kwargs)
    import logging

    quiet = [logging.getLogger(n) for n in ("fvcore", "fvcore.nn.jit_analysis")]
    levels = [lg.level for lg in quiet]
    try:
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with _w.catch_warnings(), torch.no_grad():
            _w.simplefilter("ignore")  # jit tracing warnings say nothing about the counts
            fa = FlopCountAnalysis(_Call(transformer).eval(), inputs)
            fa.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flops)
            fa.unsupported_ops_warnings(False)
            fa.uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            by_module = fa.by_module()
            total = float(fa.total())
    except Exception as exc:
        return {}, float("nan"), f"fvcore could not trace the transformer ({type(exc).__name__}: {str(exc)[:120]})"
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    flops = {n: float(by_module.get(f"t.{n}", float("nan"))) for n in names}
    return flops, total, None


def quiet(times: Sequence[float], tolerance: float) -> list[float]:
    """The times at most ``1 + tolerance`` times the smallest (a shared machine only adds time)."""
    if not times:
        return []
    low = min(times)
    return [t for t in times if t <= low * (1 + tolerance)]


def median(xs: Sequence[float]) -> float:
    """Median of a non-empty sequence, NaN for an empty one."""
    return float(statistics.median(xs)) if xs else float("nan")


def cost_table(modules: list[CacheableModule], lat: list[dict], reuse: list[dict], flops: dict[str, float],
               layout: str, batch: int) -> pd.DataFrame:
    """One row per cacheable module: total and self (children excluded) latency, FLOPs, reuse costs."""
    df = pd.DataFrame(
        {
            "module": [m.name for m in modules],
            "kind": [m.kind for m in modules],
            "block": [m.block for m in modules],
            "parent": [m.name.rsplit(".", 1)[0] if m.kind != "block" else "" for m in modules],
            "scope": "call",
            "batch": batch * (2 if CfgLayout(layout).batched else 1),
        }
    )
    for key in ("latency_ms", "latency_iqr_ms", "latency_half_ms"):
        df[key] = [r[key] for r in lat]
    df["flops"] = [flops.get(m.name, float("nan")) for m in modules]
    for col in (*REUSE_COLUMNS.values(), "out_numel"):
        df[col] = [r[col] for r in reuse]
    children = df[df.kind != "block"].groupby("parent")[["latency_ms", "latency_half_ms", "flops"]].sum(min_count=1)
    self_ms, self_half, self_flops = [], [], []
    for row in df.itertuples():
        if row.kind == "block" and row.module in children.index:
            c = children.loc[row.module]
            self_ms.append(max(0.0, row.latency_ms - c.latency_ms))
            self_half.append(max(0.0, row.latency_half_ms - c.latency_half_ms))
            self_flops.append(row.flops - c.flops if not np.isnan(c.flops) else row.flops)
        else:
            self_ms.append(row.latency_ms)
            self_half.append(row.latency_half_ms)
            self_flops.append(row.flops)
    df["self_ms"], df["self_half_ms"], df["self_flops"] = self_ms, self_half, self_flops
    return df
