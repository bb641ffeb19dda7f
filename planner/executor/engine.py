"""The engine behind one applied plan: run state (step, branch), checks against the call, stats.

Step tracking (robust without help from the pipeline):

* a transformer call whose ``timestep`` value differs from the previous call's starts a new step;
  equal values are further calls of the same step (the second CFG call with ``separate`` layout);
* a run ends after ``plan.steps`` steps (all calls of the last step made): caches are cleared;
* a timestep *larger* than the previous one starts a new run (a new pipeline call after an
  interrupted one), and so does any call after a finished run; a *smaller* one after a finished
  run means the pipeline runs more steps than the plan: refused;
* ``handle.at_step(i)`` overrides all of this for callers that drive steps themselves.

Checks against the run (:meth:`Engine._check_pipe`, :meth:`Engine._check_first_call`), at the first transformer call of every run, before
anything is computed: the per-sample shape of ``hidden_states`` (another resolution or frame count), when
the plan records it; with a pipeline, its scheduler's class, config hash and timesteps (their number,
and their values when the plan knows them) and its CFG switch where the pipeline exposes one, else,
for batched CFG layouts, that the two halves of the first call's input are the same latents (a run
without CFG has distinct samples there). A bare transformer has no scheduler to ask: its calls'
timesteps are compared with the plan's at every step (the first call catches another scheduler or step
count; a run that diverges later, or runs more steps than planned, is refused at that step). A mismatch
raises PlannerError saying what differs; with ``strict=False`` the run goes on after one warning per
run (steps beyond the plan then run without caching).

A timestep held on a GPU is never read during the run: reading it would make the host wait for the
device at every call, and a static plan does not need it to decide. Such a run is tracked by call
count instead (``calls_per_step`` calls make a step; a call after the last step starts a new run);
each call's timestep is reduced on the device and kept, and the same rules as above (equal within
a step, falling from step to step) are checked on all of them at once when the run ends: one read
per run instead of one per call. Timesteps on the CPU (plain numbers, CPU tensors) are read and
checked at every call as above, and so are the timesteps of a plan that forecasts (F, Q, L) without
knowing the sampler's timesteps itself: its forecasts extrapolate in each step's time, read from the
call (plans made by ``plan_for_runner`` and the strategies carry the timesteps).

The CFG branch: batched layouts carry both halves in one call (``[cond, uncond]`` for DiT,
``[uncond, cond]`` for PixArt/SD3); with ``separate`` calls it is the diffusers cache-context
name when the pipeline set one (Flux, Wan), else the call order within the step (cond first).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from planner.cfg import BRANCHES, CfgLayout, branch_of_context
from planner.errors import PlannerError
from planner.executor import tree
from planner.executor.output import OutputCache, served_positions
from planner.modules import module_kind
from planner.plan import ACTION_CODES, COMPUTE, FORECAST_ORDER, REUSE_CODES, Plan
from planner.plan.components import absent_steps

_MAX_EXAMPLES = 5


def _close(a: float, b: float) -> bool:
    """Timesteps equal up to half-precision rounding (the pipeline may cast them to the model's dtype)."""
    return math.isclose(a, b, rel_tol=1e-2, abs_tol=1e-6)


class _Run:
    """Where the current run is."""

    def __init__(self) -> None:
        self.started = False
        self.complete = False
        self.warned = False  # a mismatch was let through (strict=False) and said once
        self.checked = False  # the first-call checks ran
        self.step = -1
        self.last_t: float | None = None
        self.calls = 0  # calls begun in the current step
        self.branches: set[str] = set()
        self.max_step = -1
        self.visited: set[int] = set()  # steps that ran (all of 0..max_step unless at_step skipped some)
        self.token = None  # at_step block the current step belongs to
        self.accounted = False  # folded into the stats totals
        self.times: dict[int, float] = {}  # the timestep each step ran at (forecasts extrapolate in it)
        self.deferred = False  # timesteps on a device: steps by call count, checked at the run's end
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, timestep reduced on the device) per call


class Engine:
    """Shared state of one applied plan: read by every hook, written by the step tracker."""

    def __init__(self, plan: Plan, transformer: torch.nn.Module, pipe: Any, gates: torch.Tensor | None, detach_cache: bool,
                 strict: bool = True):
        self.plan = plan
        self.strict = strict  # False: mismatches with the run are warned about, not refused
        self._pipe_timesteps: list[float] | None = None  # the pipeline scheduler's, read at the start of a run
        self._device_timesteps: torch.Tensor | None = None  # ... or held on a GPU: read with the run's last check
        self._cfg_flag: bool | None = None  # the pipeline's do_classifier_free_guidance, where it has one
        self.steps = plan.steps
        self.layout = plan.layout
        self.branches = plan.branches
        self.calls_per_step = self.layout.calls_per_step
        # a TransformerPair (Wan 2.2) forwards its calls to transformers of this class
        self.transformer_cls = type(getattr(transformer, "first", transformer))
        comps = plan.model.components or {}
        self._owner = {k: c for c, ref in comps.items() for k in ref.steps}  # global step -> its transformer
        self._absent = absent_steps(comps, plan.model.modules, plan.steps)  # module -> steps its transformer skips
        self.pipe = pipe
        self.gates = gates
        self.detach_cache = detach_cache
        self.hooks: dict[str, Any] = {}  # module name -> CacheHook
        timesteps = [float(t) for t in plan.sampler.timesteps]
        self.times = timesteps if len(timesteps) == self.steps else None  # the plan's, when it knows them
        # Read by the hooks on every call:
        self.in_call = False
        self.step = 0
        self.active: list[tuple[str, ...]] = []  # stack of the branches in dim 0 of the current (sub-)call
        # Written by the tracker:
        self.run = _Run()
        self.forced_step: int | None = None
        self.forced_token: object | None = None
        self._logs: dict[tuple[str, str], bytearray] = {}
        self._fallback_examples: list[str] = []
        self._totals = {"runs": 0, "decisions": 0, "as_planned": 0, "skipped_with_parent": 0, "fallbacks": 0}
        self._hits = {ACTION_CODES[c]: 0 for c in REUSE_CODES}
        self._fallback_kinds = {"computed": 0, "reused": 0}
        self._last_executed: dict[str, dict[str, str]] = {}
        self._last_steps: list[int] = []
        self._parents = {m: module_kind(m)[1] for m in plan.model.modules}
        # None: defer the timestep checks when the timestep is a tensor off the CPU (see the module
        # docstring); True/False force one way (tests use True to run the GPU path on a CPU).
        self.deferred_timesteps: bool | None = None
        # Forecasts extrapolate in the sampler's time; without the plan's timesteps that is each step's
        # own, read from the call: such a plan cannot defer its timestep reads.
        every_code = "".join(codes for per in plan.decisions.values() for codes in per.values()) + (plan.output or "")
        self._reads_times = self.times is None and any(c in FORECAST_ORDER for c in every_code)
        self.output = OutputCache(plan.output) if plan.output is not None else None
        self._last_output: str | None = None

    def time_of(self, step: int) -> float:
        """The sampler's time at ``step``: the plan's timestep, else the one the step ran at in this run, else
        (steps driven by ``at_step`` without timesteps) the step index."""
        if self.times is not None:
            return self.times[step]
        return self.run.times.get(step, float(step))

    # ------------------------------------------------------------------ calls
    # Pure bookkeeping (and, for timesteps on the CPU, a read of the value): never traced by torch.compile.
    @torch.compiler.disable
    def begin_call(self, module: torch.nn.Module, args: tuple, kwargs: dict, context_name: str | None) -> None:
        """Work out step and branch of a transformer call and check it against the plan."""
        raw = tree.get_arg(self.transformer_cls, "timestep", args, kwargs)
        r = self.run
        counted = self.forced_step is None and raw is not None and self._defer(raw, r)
        if counted:
            r = self._advance_by_count(raw)
            t = None
        else:
            t = self._timestep(args, kwargs)
        if self.forced_step is not None:
            if not r.started or r.complete:
                r = self._start_run(check_pipe=False)
            if r.token is not self.forced_token:  # a new at_step block is a new step
                r.step, r.calls, r.token = self.forced_step, 0, self.forced_token
                r.branches.clear()
        elif counted:
            pass  # the step was advanced by _advance_by_count
        else:
            if t is None:
                raise PlannerError(
                    f"cannot tell the denoising step: the {self.transformer_cls.__name__} call has no timestep argument "
                    "(drive steps with handle.at_step(i))"
                )
            if (
                not r.started
                or r.token is not None  # the previous calls were driven by at_step
                or r.deferred  # the previous run was tracked by call count
                or (r.complete and t >= r.last_t)
                or (not r.complete and t > r.last_t)  # a new pipeline call after an interrupted one
            ):
                r = self._start_run(check_pipe=True)
                r.step = 0
            elif r.complete:
                self._mismatch(f"plan was made for {self.steps} steps, the pipeline runs more")
                r.last_t = t  # strict=False: the steps beyond the plan run as they are, uncached
                self.in_call, self.active = False, []
                return
            elif t < r.last_t:
                self._check_calls_done()
                r.step += 1
                r.calls = 0
                r.branches.clear()
            r.last_t = t
        if not 0 <= r.step < self.steps:
            raise PlannerError(f"step {r.step} is outside the plan's {self.steps} steps")
        if self._owner:
            self._check_component(getattr(module, "current", None), r.step)
        if not r.checked:
            r.checked = True
            self._check_input_shape(args, kwargs)
            if self.forced_step is None:
                self._check_first_call(args, kwargs)
        if self.forced_step is None:
            if self.pipe is None or self._pipe_timesteps is None:
                self._check_timestep(r.step, t)
        r.calls += 1
        if t is not None:
            r.times.setdefault(r.step, t)
        active = self._branches_of_call(args, kwargs, context_name)
        r.max_step = max(r.max_step, r.step)
        r.visited.add(r.step)
        self.step = r.step
        self.active = [active]
        self.in_call = True

    def served_output(self) -> Any:
        """The transformer's output served for the current call where the plan's ``output`` says so (the
        transformer then does not run), else ``None``."""
        if self.output is None or not self.in_call:
            return None
        return self.output.serve(self, self.step, self._output_key())

    def keep_output(self, output: Any) -> None:
        """The transformer computed ``output`` for the current call: kept where the plan serves outputs."""
        if self.output is not None and self.in_call:
            self.output.store(self.step, self._output_key(), output)

    def _output_key(self) -> tuple[str | None, tuple[str, ...]]:
        """Whose outputs the current call's belong with: its transformer's (several transformers are different
        networks, never forecast through each other's outputs) and the branches it carries."""
        return self._owner.get(self.step), self.active[-1]

    @torch.compiler.disable
    def end_call(self) -> None:
        """A transformer call returned: close the run after the last call of the last step."""
        self.in_call = False
        self.active = []
        r = self.run
        if self.forced_step is None and r.step == self.steps - 1 and r.calls >= self.calls_per_step:
            if r.deferred:
                self._check_deferred(r)
            self._finish_run()
            r.complete = True  # kept (with last_t) so the next call can tell a new run from an overlong one

    @torch.compiler.disable
    def abort_call(self) -> None:
        """A transformer call raised: forget the run (its caches may be half-written)."""
        self.in_call = False
        self.active = []
        self.reset()

    def reset(self) -> None:
        """Clear every cache and start over at the next call (the finished part still counts in stats)."""
        self._finish_run()
        self.run = _Run()

    def _start_run(self, check_pipe: bool) -> _Run:
        self._finish_run()
        self.run = _Run()
        if check_pipe:
            self._check_pipe()
        self.run.started = True
        return self.run

    def _finish_run(self) -> None:
        r = self.run
        if r.started and not r.accounted and r.max_step >= 0:
            self._account()
        r.accounted = True
        for hook in self.hooks.values():
            hook.caches.clear()
        if self.output is not None:
            self.output.clear()
        self._logs.clear()

    def _defer(self, t: Any, r: _Run) -> bool:
        """Whether this call's step is tracked by call count (its timestep stays on the device)."""
        if r.started and not r.complete and r.token is None:
            return r.deferred  # a run keeps the mode it started in
        if self._reads_times:
            return False
        if self.deferred_timesteps is not None:
            return self.deferred_timesteps and isinstance(t, torch.Tensor)
        return isinstance(t, torch.Tensor) and t.device.type != "cpu"

    def _advance_by_count(self, t: torch.Tensor) -> _Run:
        """Step tracking without reading the timestep: ``calls_per_step`` calls make a step."""
        r = self.run
        if not r.started or r.complete or r.token is not None:
            r = self._start_run(check_pipe=True)
            r.step = 0
            r.deferred = True
        elif r.calls >= self.calls_per_step:
            r.step += 1
            r.calls = 0
            r.branches.clear()
        if t.numel():
            r.pending.append((r.step, t.detach().reshape(-1).max()))  # reduced on the device, not read
        return r

    def _check_deferred(self, r: _Run) -> None:
        """The per-call timestep rules, checked on a finished deferred run (its one device read)."""
        pending, r.pending = r.pending, []
        scheduler_ts, self._device_timesteps = self._device_timesteps, None
        if not pending and scheduler_ts is None:
            return
        parts = [torch.stack([v.float() for _, v in pending])] if pending else []
        if scheduler_ts is not None:
            parts.append(scheduler_ts.float().to(parts[0].device) if parts else scheduler_ts.float())
        values = torch.cat(parts).tolist()  # the run's one read
        if scheduler_ts is not None:
            values, ts = values[:len(pending)], values[len(pending):]
            self._compare_pipe_timesteps(ts)
        for i in range(1, len(pending)):
            (s0, _), (s1, _) = pending[i - 1], pending[i]
            v0, v1 = values[i - 1], values[i]
            if s1 == s0 and v1 != v0:
                raise PlannerError(
                    f"step {s1} of the plan got transformer calls with timesteps {v0:g} and {v1:g}: the pipeline makes "
                    f"another number of calls per step than the plan's CFG layout {self.layout!r} ({self.calls_per_step})"
                )
            if s1 != s0 and not v1 < v0:
                raise PlannerError(
                    f"timestep {v1:g} at step {s1} does not fall from {v0:g} at step {s0}: the pipeline's calls do not "
                    f"follow the plan's {self.steps} steps of {self.calls_per_step} call(s)"
                )

    # ------------------------------------------------------------------ checks
    def _timestep(self, args: tuple, kwargs: dict) -> float | None:
        t = tree.get_arg(self.transformer_cls, "timestep", args, kwargs)
        if t is None:
            return None
        if isinstance(t, torch.Tensor):
            # max: Wan 2.2 expands per-token timesteps with the conditioning frame at 0
            return float(t.detach().reshape(-1).max()) if t.numel() else None
        return float(t)

    def _check_calls_done(self) -> None:
        r = self.run
        if r.calls != self.calls_per_step:
            if self.layout is CfgLayout.SEPARATE:
                raise PlannerError(
                    f"plan's CFG layout 'separate' expects 2 transformer calls per step, step {r.step} made {r.calls} "
                    "(is CFG on? for Flux: a negative prompt and true_cfg_scale > 1)"
                )
            raise PlannerError(f"plan's CFG layout {self.layout!r} expects 1 transformer call per step, step {r.step} made {r.calls}")

    def _mismatch(self, message: str) -> None:
        """A run that differs from what the plan was made for: PlannerError, or with ``strict=False`` one
        warning per run."""
        if self.strict:
            raise PlannerError(f"{message} (apply_plan(..., strict=False) runs it anyway)")
        if not self.run.warned:
            self.run.warned = True
            warnings.warn(f"{message}; running anyway (strict=False): outputs will differ from what the plan "
                          "was made for", stacklevel=2)

    def _check_pipe(self) -> None:
        """At the start of a run: the pipeline's scheduler (class, config, timesteps) and CFG switch must
        fit the plan."""
        from planner.plan.build import config_hash

        pipe, s = self.pipe, self.plan.sampler
        self._pipe_timesteps = None
        if pipe is None:
            return
        sched = getattr(pipe, "scheduler", None)
        cls = type(sched).__name__
        if sched is not None and s.scheduler_class and cls != s.scheduler_class:
            self._mismatch(f"plan was made for a {s.scheduler_class}, the pipeline's scheduler is a {cls}")
        elif sched is not None and s.scheduler_config and getattr(sched, "config", None) is not None:
            theirs = config_hash(sched.config)
            if theirs != s.scheduler_config:
                self._mismatch(f"plan was made for a {cls} with another config (config hash {s.scheduler_config}, "
                               f"the pipeline's {theirs})")
        timesteps = getattr(sched, "timesteps", None)
        self._device_timesteps = None
        if isinstance(timesteps, torch.Tensor) and timesteps.device.type != "cpu":
            # not read now (a sync): counted here, compared with the plan's in the run's one read at its end
            if timesteps.numel() != self.steps:
                self._mismatch(f"plan was made for {self.steps} steps, the pipeline runs {timesteps.numel()}")
            self._device_timesteps = timesteps.detach().reshape(-1)
        elif timesteps is not None:
            self._pipe_timesteps = [float(x) for x in (timesteps.tolist() if isinstance(timesteps, torch.Tensor)
                                                       else timesteps)]
            self._compare_pipe_timesteps(self._pipe_timesteps)
        try:
            cfg_on = getattr(pipe, "do_classifier_free_guidance")
        except Exception:  # property reading a field this pipeline never set
            cfg_on = None
        self._cfg_flag = cfg_on if isinstance(cfg_on, bool) else None
        if isinstance(cfg_on, bool) and cfg_on != (self.layout is not CfgLayout.NONE):
            state = "on" if cfg_on else "off"
            self._mismatch(f"plan was made for CFG layout {self.layout.value!r}, but the pipeline runs with CFG {state}")

    def _compare_pipe_timesteps(self, ts: list[float]) -> None:
        """The pipeline scheduler's timesteps against the plan's: their number, and their values when known."""
        s = self.plan.sampler
        if len(ts) != self.steps:
            self._mismatch(f"plan was made for {self.steps} steps, the pipeline runs {len(ts)}")
        elif s.timesteps and not all(_close(a, b) for a, b in zip(ts, s.timesteps)):
            k = next(i for i, (a, b) in enumerate(zip(ts, s.timesteps)) if not _close(a, b))
            self._mismatch(f"the pipeline's timesteps differ from the plan's (step {k}: {ts[k]:g}, "
                           f"the plan's {float(s.timesteps[k]):g}): another scheduler setting")

    def _check_first_call(self, args: tuple, kwargs: dict) -> None:
        """Batched CFG through a pipeline that does not say whether CFG is on (DiT, PixArt): its first call
        carries the same latents twice ([cond, uncond] or [uncond, cond]); distinct halves mean CFG is off.
        (A bare transformer may be fed any halves: only an odd batch tells there.)"""
        if self.pipe is None or self._cfg_flag is not None or len(self.layout.batch_order) != 2:
            return
        hs = tree.get_arg(self.transformer_cls, "hidden_states", args, kwargs)
        if not isinstance(hs, torch.Tensor) or hs.dim() == 0 or hs.shape[0] % 2:
            return  # an odd batch is refused with its own message
        half = hs.shape[0] // 2
        if not torch.equal(hs[:half], hs[half:]):
            self._mismatch(f"plan was made for batched CFG (layout {self.layout.value!r}), but the first call's two "
                           "halves hold different latents: the run has CFG off (or another layout)")

    def _check_input_shape(self, args: tuple, kwargs: dict) -> None:
        """The first call's ``hidden_states`` must have the per-sample shape the plan was made with (when the
        plan records it): another shape is another resolution or frame count, whose activations and
        step-to-step changes the plan never saw. The shape is metadata: nothing is read from the device."""
        want = self.plan.sampler.input_shape
        hs = tree.get_arg(self.transformer_cls, "hidden_states", args, kwargs)
        if want is None or not isinstance(hs, torch.Tensor) or list(hs.shape[1:]) == list(want):
            return
        s = self.plan.sampler
        size = ([f"{s.resolution[0]}x{s.resolution[1]}"] if s.resolution else []) + ([f"{s.frames} frames"] if s.frames else [])
        made = f" ({', '.join(size)})" if size else ""
        self._mismatch(f"plan was made for transformer inputs of shape {list(want)} per sample{made}, this run's are "
                       f"{list(hs.shape[1:])}: another resolution or frame count")

    def _check_timestep(self, step: int, t: float | None) -> None:
        """A run without a pipeline to ask: its timestep at ``step`` must be the plan's (when the plan knows it)."""
        ts = self.plan.sampler.timesteps
        if t is None or not ts or step >= len(ts):
            return
        want = float(ts[step])
        if _close(t, want) or _close(t * 1000.0, want):  # Flux-like pipelines pass t / 1000
            return
        self._mismatch(f"step {step} of the run has timestep {t:g}, the plan's sampler has {want:g} "
                       f"(plan made for {self.plan.sampler.scheduler_class or self.plan.sampler.scheduler}, "
                       f"{self.steps} steps): another scheduler or step count")

    def _check_component(self, component: str | None, step: int) -> None:
        """A pipeline with several transformers must run each step on the one the plan says (Wan 2.2: the
        boundary_ratio the plan was made with)."""
        want = self._owner.get(step)
        if component is not None and want is not None and component != want:
            self._mismatch(f"step {step} of the run is on {component}, the plan has it on {want} (another "
                           "boundary_ratio or scheduler than the plan was made with)")

    def _branches_of_call(self, args: tuple, kwargs: dict, context_name: str | None) -> tuple[str, ...]:
        r = self.run
        if self.layout is CfgLayout.SEPARATE:
            branch = branch_of_context(context_name)
            if branch is None and r.calls <= 2:  # no context: cond's call comes first
                branch = BRANCHES[r.calls - 1]
            if branch is None or branch in r.branches:
                raise PlannerError(
                    f"plan's CFG layout 'separate' expects one cond and one uncond call per step; step {r.step} got a "
                    f"{'second ' + branch if branch else str(r.calls) + 'th'} call"
                )
            r.branches.add(branch)
            return (branch,)
        if r.calls > 1:
            raise PlannerError(
                f"plan's CFG layout {self.layout!r} expects 1 transformer call per step, step {r.step} got a second "
                "(a plan for separate CFG calls is needed)"
            )
        order = self.layout.batch_order
        if len(order) == 2:
            batch = tree.call_batch(self.transformer_cls, args, kwargs)
            if batch % 2:
                raise PlannerError(f"plan's CFG layout {self.layout!r} needs an even batch ([cond, uncond] halves), got {batch}")
        return order

    # ------------------------------------------------------------------ stats
    @torch.compiler.disable
    def log(self, module: str, branch: str, step: int, code: str) -> None:
        """Record the action a module really took at ``step`` on ``branch``."""
        key = (module, branch)
        row = self._logs.get(key)
        if row is None:
            row = self._logs[key] = bytearray(b"-" * self.steps)
        row[step] = ord(code)

    def _account(self) -> None:
        """Fold the finished run's logs into the totals; keep its executed map for :meth:`stats`."""
        ks = sorted(self.run.visited)
        reached = len(ks)
        contiguous = ks == list(range(reached))

        def pick(row: bytearray | None) -> str:
            if row is None:
                return "-" * reached
            return row[:reached].decode() if contiguous else "".join(chr(row[k]) for k in ks)

        executed: dict[str, dict[str, str]] = {}
        totals, hits = self._totals, self._hits
        gated = self.gates is not None
        self._last_output = self.output.executed(ks) if self.output is not None else None
        served = served_positions(self._last_output)  # positions in ks where the transformer did not run
        for module in self.plan.model.modules:
            per: dict[str, str] = {}
            parent = self._parents.get(module)
            for b in self.branches:
                if module in self.hooks:
                    done = pick(self._logs.get((module, b)))
                elif parent is not None and parent in self.hooks:
                    done = "".join(COMPUTE if c == COMPUTE else "-" for c in pick(self._logs.get((parent, b))))
                else:
                    done = "".join("-" if i in served else COMPUTE for i in range(reached))
                codes = self.plan.codes(module, b)
                planned = COMPUTE * reached if gated else (codes[:reached] if contiguous else "".join(codes[k] for k in ks))
                absent = self._absent.get(module)
                if absent:  # steps its transformer does not run are no decisions of it ("." in executed)
                    per[b] = "".join("." if k in absent else c for k, c in zip(ks, done))
                    done = "".join(c for k, c in zip(ks, done) if k not in absent)
                    planned = "".join(c for k, c in zip(ks, planned) if k not in absent)
                    kept = [k for k in ks if k not in absent]
                else:
                    per[b], kept = done, ks
                n = len(done)
                totals["decisions"] += n
                if done == planned:
                    totals["as_planned"] += n
                    for c in REUSE_CODES:
                        hits[ACTION_CODES[c]] += done.count(c)
                    continue
                for k, (p, e) in enumerate(zip(planned, done)):
                    if e == "-":
                        totals["skipped_with_parent"] += 1
                    elif e == p:
                        totals["as_planned"] += 1
                        if e != COMPUTE:
                            hits[ACTION_CODES[e]] += 1
                    else:
                        totals["fallbacks"] += 1
                        self._fallback_kinds["computed" if e == COMPUTE else "reused"] += 1
                        if e != COMPUTE:
                            hits[ACTION_CODES[e]] += 1
                        if len(self._fallback_examples) < _MAX_EXAMPLES:
                            self._fallback_examples.append(
                                f"{module} {b} step {kept[k]}: planned {ACTION_CODES[p]}, did {ACTION_CODES[e]}"
                            )
            executed[module] = per
        totals["runs"] += 1
        self._last_executed = executed
        self._last_steps = ks

    def stats(self) -> dict:
        """Totals over the runs finished so far plus the last run's per-step detail (see ``PlanHandle.stats``)."""
        if self.run.started and self.run.max_step >= 0 and not self.run.accounted:
            # count the run in progress too, without disturbing it
            saved = (dict(self._totals), dict(self._hits), dict(self._fallback_kinds), list(self._fallback_examples),
                     self._last_executed, self._last_steps, self._last_output)
            self._account()
            out = self._stats_dict(partial=True)
            (self._totals, self._hits, self._fallback_kinds, self._fallback_examples,
             self._last_executed, self._last_steps, self._last_output) = saved
            return out
        return self._stats_dict(partial=False)

    def _stats_dict(self, partial: bool) -> dict:
        t = dict(self._totals)
        executed = self._last_executed
        leaves = self.plan.leaf_modules()
        reached = len(self._last_steps)
        served = served_positions(self._last_output)  # every module shows "-" there: not worth listing
        per_step = [
            sum(executed[m][b][k] == COMPUTE for m in leaves for b in self.branches)
            / max(1, sum(executed[m][b][k] != "." for m in leaves for b in self.branches))  # "." : transformer not run
            for k in range(reached)
        ]
        return {
            "mode": "gates" if self.gates is not None else "plan",
            "runs": t["runs"],
            "run_in_progress": partial,
            "steps": self.steps,
            "hooked_modules": len(self.hooks),
            "decisions": t["decisions"],
            "as_planned": t["as_planned"],
            "as_planned_fraction": t["as_planned"] / t["decisions"] if t["decisions"] else None,
            "skipped_with_parent": t["skipped_with_parent"],
            "fallbacks": t["fallbacks"],
            "fallback_kinds": dict(self._fallback_kinds),
            "fallback_examples": list(self._fallback_examples),
            "reuse_hits": dict(self._hits),
            "steps_run": list(self._last_steps),
            "computed_fraction_per_step": per_step,
            "computed_fraction": sum(per_step) / len(per_step) if per_step else None,
            "output": self._last_output,  # what the transformer's output did per step (plans with ``output``)
            "executed": {
                m: (v[self.branches[0]] if len(set(v.values())) == 1 else dict(v))
                for m, v in executed.items()
                if m in self.hooks or any(c not in (COMPUTE, ".") and i not in served
                                          for codes in v.values() for i, c in enumerate(codes))
            },
        }
