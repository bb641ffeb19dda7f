"""Know a profile's cost before paying it: a short probe run, and from it the model calls, memory and
time a profile run will take, checked against the memory available.

The probe runs the pipeline for a short run (``PROBE_STEPS`` steps: one step is a special case in
some pipelines, PixArt-alpha's distilled mode, LTX's scheduler) on the first micro-batch with a hook on every cacheable
module that records what the similarity pass would keep of its output (shapes, dtype, whether a
residual exists) and what the cost pass would capture, and measures the extra memory of that step
(the activations). Everything else is arithmetic on those figures:

* ring buffers: per module, branch, output tensor and (output, residual): ``lags`` x per-sample
  features (token-sampled where ``--token-sample`` applies) x micro-batch x element size;
* the comparison's float32 temporaries, about 4 x ``lags`` x micro-batch x the largest module's
  per-sample features x 4 bytes, and the statistics (float64, 5 arrays);
* cost pass: one capture per distinct module signature (inputs and output), and the executor's
  caches while its hook overhead is calibrated (every block and sub-layer hooked);
* time: the probe's transformer call time x the calls of each pass, plus the run's fixed part (the
  timed probe step decodes, as most cost-pass runs do), the hooks' own time (a bare diffusers hook's
  per call), the similarity statistics' own work (a real :class:`SimilarityCollector` fed synthetic
  outputs of each shape the probe saw) and the modules the cost pass times alone.

The similarity pass's peak is activations + rings + temporaries + statistics, the cost pass's
activations + captures + executor caches; the larger must fit in 90 % of what is available on the
device the model runs on (the host's memory for a CPU).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from planner.cfg import COND, CfgLayout
from planner.errors import PlannerError
from planner.modules import LEVEL_KINDS, CacheableModule
from planner.profile.batching import micro_batch
from planner.profile.capture import (
    ModuleWatch,
    StepTracker,
    attach,
    detach_hooks,
    input_tensors,
    output_tensors,
    pair_residual_inputs,
    resolve_modules,
)
from planner.profile.memory import Peak, device_available, fmt_bytes, host_available, peak_memory
from planner.profile.similarity import METRICS, SimilarityCollector
from planner.profile.timing import EXECUTOR_ROUNDS, TimingConfig, call_signature, time_hook_overhead
from planner.profile.tokens import TOKEN_AXIS, token_sampler

# The share of the available memory a run may plan to use: allocator fragmentation and everything
# the estimate does not see (the pipeline's own buffers, the Python heap) need room too.
FIT_FRACTION = 0.9
# A profile longer than this gets the --shard hint.
LONG_RUN_S = 1800.0


@dataclass
class OutputShape:
    """One output tensor of a module as the similarity pass keeps it, per sample and branch."""

    shape: tuple[int, ...]  # without the batch dimension
    residual: bool
    itemsize: int
    dtype: str = "float32"

    def features(self, token_sample: int | None) -> int:
        """Elements per sample the ring keeps (token-sampled when that applies)."""
        shape = self.shape
        if token_sample is not None and len(shape) == 2 and shape[TOKEN_AXIS - 1] > token_sample:
            shape = (token_sample, *shape[1:])
        return math.prod(shape)

    @property
    def tokens(self) -> int | None:
        return self.shape[0] if len(self.shape) == 2 else None


@dataclass
class ModuleProbe:
    """What the probe saw of one module's first call."""

    name: str
    kind: str
    outputs: list[OutputShape]
    out_bytes: int  # the whole call's output (every branch in it)
    signature: Any = field(repr=False, default=None)
    in_bytes: int = 0


@dataclass
class Probe:
    """The probe's figures (see the module docstring)."""

    batch: int
    calls_per_step: int
    branches: int
    modules: list[ModuleProbe]
    probe_run_s: float
    call_s: float | None
    peak: Peak
    device: str
    timed: bool

    @property
    def max_tokens(self) -> int | None:
        tokens = [o.tokens for m in self.modules for o in m.outputs if o.tokens is not None]
        return max(tokens) if tokens else None

    def ring_bytes(self, batch: int, lags: int, token_sample: int | None) -> int:
        """Bytes of every ring buffer of one micro-batch of ``batch`` samples."""
        per_sample = sum(o.features(token_sample) * o.itemsize * (2 if o.residual else 1)
                         for m in self.modules for o in m.outputs)
        return per_sample * self.branches * lags * batch

    def temp_bytes(self, batch: int, lags: int, token_sample: int | None) -> int:
        """The comparison's float32 temporaries for the largest module (4 arrays of lags x batch x features)."""
        largest = max((sum(o.features(token_sample) for o in m.outputs) for m in self.modules), default=0)
        return 4 * lags * batch * largest * 4

    def capture_bytes(self) -> int:
        """What the cost pass's capture run holds: one call's inputs and output per distinct signature."""
        seen: dict = {}
        for m in self.modules:
            seen.setdefault(m.signature, m.in_bytes + m.out_bytes)
        return sum(seen.values())

    def executor_bytes(self) -> int:
        """The executor's caches while its overhead is calibrated: every block and sub-layer keeps its
        last output."""
        kinds = {k for group in LEVEL_KINDS.values() for k in group}
        return sum(m.out_bytes for m in self.modules if m.kind in kinds)


class _ShapeSink:
    """Records, for each module's first call at step 0, what the similarity pass and the capture would keep."""

    def __init__(self, modules: list[CacheableModule], targets: list[torch.nn.Module], layout: CfgLayout, batch: int):
        self.modules, self.targets = modules, targets
        self.layout = CfgLayout(layout)
        self.expected = batch * (2 if self.layout.batched else 1)
        self.seen: dict[int, ModuleProbe] = {}
        self.tracker: StepTracker | None = None

    def __call__(self, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        # the first call of each module (step 0; with two transformers, Wan 2.2, the second's first step)
        if index in self.seen or self.tracker.branch not in (None, COND):
            return
        m = self.modules[index]
        outs = output_tensors(output)
        hidden, enc = input_tensors(args, kwargs)
        pairs = pair_residual_inputs(m.kind, outs, hidden, enc)
        # per sample, so one shape serves every branch of a batched call
        kept = [OutputShape(tuple(o.shape[1:]), p is not None, o.element_size(), str(o.dtype).replace("torch.", ""))
                for o, p in zip(outs, pairs) if o.dim() >= 1 and o.shape[0] == self.expected]
        leaves = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        self.seen[index] = ModuleProbe(
            name=m.name, kind=m.kind, outputs=kept,
            out_bytes=sum(o.numel() * o.element_size() for o in outs),
            signature=call_signature(self.targets[index], args, kwargs),
            in_bytes=sum(x.numel() * x.element_size() for x in leaves),
        )


PROBE_STEPS = 2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def probe(runner, modules: list[CacheableModule], sampler, conds: list, seeds: list[int], *, timed: bool = True) -> Probe:
    """Run ``PROBE_STEPS`` steps of ``sampler`` on ``conds``/``seeds`` (one micro-batch, output decoded) with
    shape-recording hooks, measuring its extra memory; with ``timed`` a second such run without them, decoding its
    output, is timed (the first one warms the device up). The model is left without any hook."""
    layout = runner.cfg_layout(sampler)
    one = replace(sampler, steps=PROBE_STEPS)
    transformer = runner.transformer
    targets = resolve_modules(transformer, modules)
    device = torch.device(runner.device)
    sink = _ShapeSink(modules, targets, layout, len(conds))
    tracker = StepTracker(layout)
    sink.tracker = tracker
    hooks = [(transformer, tracker, "probe.step")]
    hooks += [(mod, ModuleWatch(i, sink), f"probe.{m.name}") for i, (m, mod) in enumerate(zip(modules, targets))]
    hs = attach(transformer, hooks)
    t0 = time.perf_counter()
    try:
        with peak_memory(device) as peak:
            runner.run(conds, seeds, one, output="image")  # with the decode: the cost pass's runs decode too
    finally:
        detach_hooks(transformer, hs)
    run_s = time.perf_counter() - t0
    _fill_from_first_transformer(modules, sink.seen)
    missing = [m.name for i, m in enumerate(modules) if i not in sink.seen]
    if missing:
        from planner.profile.artifact import ProfileError

        raise ProfileError(f"the probe step never called: {', '.join(missing[:5])}")
    call_s = None
    if timed:
        calls: list[float] = []
        starts: list[float] = []

        def on_call(tr):
            _sync(device)
            starts.append(time.perf_counter())

        def on_return(tr):
            _sync(device)
            calls.append(time.perf_counter() - starts[-1])

        clock = StepTracker(layout, on_call=on_call, on_return=on_return)
        hs = attach(transformer, [(transformer, clock, "probe.clock")])
        try:
            _sync(device)
            t0 = time.perf_counter()
            runner.run(conds, seeds, one, output="image")  # most timed runs of the cost pass decode
            _sync(device)
            run_s = time.perf_counter() - t0
        finally:
            detach_hooks(transformer, hs)
        call_s = sorted(calls)[len(calls) // 2] if calls else None
    return Probe(
        batch=len(conds), calls_per_step=layout.calls_per_step, branches=len(layout.branches),
        modules=[sink.seen[i] for i in range(len(modules))], probe_run_s=run_s, call_s=call_s,
        peak=peak, device=str(device), timed=timed,
    )


def _fill_from_first_transformer(modules: list[CacheableModule], seen: dict) -> None:
    """With two transformers (Wan 2.2) a short probe may not reach the second one's steps: its modules take
    the shapes of the first one's module of the same name (the two share one architecture)."""
    index = {m.name: i for i, m in enumerate(modules)}
    for i, m in enumerate(modules):
        head, _, rest = m.name.partition(".")
        j = index.get(rest)
        if i not in seen and head.startswith("transformer_") and j is not None and j in seen:
            seen[i] = replace(seen[j], name=m.name)


class _FakeTracker:
    def __init__(self):
        self.step, self.branch = 0, None


def statistics_seconds(p: Probe, layout: CfgLayout, lags: int, batch: int, token_sample: int | None,
                       device: torch.device, repeats: int = 3) -> float:
    """Seconds the similarity statistics add to one step (every module, every branch), measured by
    feeding a real :class:`SimilarityCollector` synthetic outputs of each distinct shape the probe saw
    (rings full, so every lag is compared)."""
    layout = CfgLayout(layout)
    memo: dict[tuple, float] = {}
    total = 0.0
    for m in p.modules:
        for o in m.outputs:
            key = (o.shape, o.residual, o.dtype)
            if key not in memo:
                memo[key] = _collector_step_s(o, layout, lags, batch, token_sample, device, repeats)
            total += memo[key]
    return total


def _collector_step_s(o: OutputShape, layout: CfgLayout, lags: int, batch: int, token_sample: int | None,
                      device: torch.device, repeats: int) -> float:
    fake = CacheableModule(name="probe", kind="attn", block=0, cls="Probe")
    steps = lags + 1 + repeats
    collector = SimilarityCollector([fake], layout, steps, lags, device, token_sampler(token_sample))
    collector.batch = batch
    collector.tracker = tracker = _FakeTracker()
    dtype = getattr(torch, o.dtype, torch.float32)
    calls = [(None, 2 * batch)] if layout.batched else ([(COND, batch), ("uncond", batch)] if layout is CfgLayout.SEPARATE
                                                         else [(COND, batch)])
    outputs = {n: torch.randn((n, *o.shape), device=device, dtype=dtype) for _, n in calls}
    # an input of the output's shape makes a residual; one of another shape does not
    inputs = {n: torch.randn((n, *o.shape) if o.residual else (1,), device=device, dtype=dtype) for _, n in calls}
    times = []
    with torch.no_grad():
        for step in range(steps):
            tracker.step = step
            _sync(device)
            t0 = time.perf_counter()
            for branch, n in calls:
                tracker.branch = branch
                collector(0, (inputs[n],), {}, outputs[n])
            _sync(device)
            if step > lags:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@dataclass
class Estimate:
    """What a profile run will take (see the module docstring); ``fits`` None when memory is unknown."""

    model: str
    device: str
    steps: int
    samples: int
    batch: int
    chunks: int
    lags: int
    token_sample: int | None
    max_tokens: int | None
    costs: str
    calls: dict[str, int]
    runs: dict[str, int]
    time_s: dict[str, float | None]
    memory: dict[str, int | None]
    available: int | None
    available_where: str
    host_available: int | None
    fits: bool | None
    problem: str | None
    fixes: list[str]
    probe: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A readable table of the estimate."""
        m = self.memory
        lines = [
            f"dry run: {self.model} on {self.device}, {self.steps} steps, {self.samples} calibration samples in "
            f"{self.chunks} micro-batch(es) of {self.batch}, {self.lags} lags, "
            + (f"token sample {self.token_sample} of {self.max_tokens}" if self.token_sample else f"all {self.max_tokens} tokens"),
            f"probe: {PROBE_STEPS} steps at batch {self.batch} took {self.probe['run_s']:.3f} s"
            + (f"; transformer call {self.probe['call_s'] * 1e3:.1f} ms" if self.probe.get("call_s") else ""),
            "",
            f"{'pass':<22}{'model calls':>12}{'runs':>6}{'time':>12}",
        ]
        for key in ("probe", "similarity", "cost", "total"):
            t = self.time_s.get(key)
            lines.append(f"{key:<22}{self.calls.get(key, 0):>12}{self.runs.get(key, 0):>6}{(f'{t:.1f} s' if t is not None else '?'):>12}")
        if self.time_s.get("statistics") is not None:
            lines.append(f"  (the similarity pass's own statistics: {self.time_s['statistics']:.1f} s; "
                         f"modules timed alone in the cost pass: {self.calls.get('module_replays', 0)} calls)")
        lines += [
            "",
            f"memory on {self.available_where}:",
            f"  activations of one step (probe)   {fmt_bytes(m['activations'])}",
            f"  ring buffers (lags of outputs)     {fmt_bytes(m['rings'])}",
            f"  comparison temporaries             {fmt_bytes(m['temporaries'])}",
            f"  statistics                         {fmt_bytes(m['statistics'])}",
            f"  cost pass captures                 {fmt_bytes(m['captures'])}",
            f"  executor caches (calibration)      {fmt_bytes(m['executor'])}",
            f"  peak, similarity pass              {fmt_bytes(m['similarity_peak'])}",
            f"  peak, cost pass                    {fmt_bytes(m['cost_peak'])}",
            f"  available                          {fmt_bytes(self.available)}",
        ]
        if not self.available_where.startswith("the host"):
            lines.append(f"host: probe step peak {fmt_bytes(m.get('host_peak_probe'))}, available {fmt_bytes(self.host_available)}")
        lines.append("")
        if self.fits is None:
            lines.append("fits: unknown (available memory could not be read)")
        elif self.fits:
            lines.append(f"fits: yes (peak {fmt_bytes(m['peak'])} of {fmt_bytes(self.available)} available)")
        else:
            lines.append(f"fits: NO. {self.problem}")
        lines += [f"  fix: {f}" for f in self.fixes]
        return "\n".join(lines)


def _counts(probe_: Probe, steps: int, chunks: int, costs: str, samples_batch: int, batched: bool,
            timing: TimingConfig, has_vae: bool, n_groups: int) -> tuple[dict, dict, dict]:
    """Model calls, runs and a run-size factor (1 = a run at the micro-batch) of each pass, and the
    runs that carry a hook on every module (for the hooks' own time)."""
    cps = probe_.calls_per_step
    sim_runs = chunks
    half = batched and samples_batch >= 2 and samples_batch % 2 == 0
    if costs == "flops":
        cost_runs, cost_weight = 1, 1.0
        replay_calls = 0
    else:
        per_round = 1 + (1 if half else 0) + 1 + (1 if has_vae else 0)
        cost_runs = 1 + timing.run_repeats * per_round + (EXECUTOR_ROUNDS if n_groups else 0)
        cost_weight = cost_runs - (timing.run_repeats * 0.5 if half else 0)  # half-batch runs cost about half
        # the replay fallback (odd micro-batch with batched CFG): every module alone, full and half batch
        replay_calls = 0 if half or not batched else 2 * (timing.warmup + timing.repeats)
    calls = {"probe": cps * 2, "similarity": sim_runs * steps * cps, "cost": cost_runs * steps * cps}
    calls["total"] = sum(calls.values())
    runs = {"probe": 2, "similarity": sim_runs, "cost": cost_runs}
    runs["total"] = sum(runs.values())
    hooked = 0 if costs == "flops" else timing.run_repeats * (1 + (1 if half else 0)) + (EXECUTOR_ROUNDS if n_groups else 0)
    return calls, runs, {"similarity": float(sim_runs), "cost": cost_weight, "replay_calls": replay_calls,
                         "hooked_cost_runs": hooked}


def estimate_profile(runner, sampler, *, samples: int, batch_size: int | None = None, lags: int = 3,
                     token_sample: int | None = None, costs: str = "measured", timing: TimingConfig | None = None,
                     seed: int = 0, probe_result: Probe | None = None, timed: bool = True) -> Estimate:
    """Estimate a ``profile_model`` run (same arguments) from a short probe run; runs the probe unless
    given one. Never writes anything. See the module docstring for what is counted."""
    sampler = runner.resolve(sampler)
    layout = runner.cfg_layout(sampler)
    modules = runner.modules()
    batch = micro_batch(runner, samples, batch_size)
    chunks = -(-samples // batch)
    if probe_result is None:
        conds = runner.conditions(batch, seed)
        probe_result = probe(runner, modules, sampler, conds, [seed + i for i in range(batch)], timed=timed)
    p = probe_result
    timing = timing or TimingConfig()
    has_vae = getattr(getattr(runner, "pipe", None), "vae", None) is not None
    groups = sum(1 for kinds in LEVEL_KINDS.values() if any(m.kind in kinds for m in modules))
    calls, runs, weights = _counts(p, sampler.steps, chunks, costs, batch, layout.batched, timing, has_vae, groups)
    calls["module_replays"] = weights["replay_calls"] * len(p.modules)  # cost pass: modules timed alone

    scale = batch / p.batch  # the probe may have run at another batch
    device = torch.device(runner.device)
    activations = p.peak.device if device.type == "cuda" else p.peak.host
    activations = int(activations * scale) if activations is not None else None
    rings = p.ring_bytes(batch, lags, token_sample)
    temps = p.temp_bytes(batch, lags, token_sample)
    stat_bytes = sampler.steps * len(modules) * len(layout.branches) * (lags + 1) * len(METRICS) * 5 * 8
    captures = int(p.capture_bytes() * scale)
    executor = int(p.executor_bytes() * scale)
    act = activations or 0
    sim_peak = act + rings + temps + stat_bytes
    cost_peak = act + captures + executor
    peak = max(sim_peak, cost_peak)
    memory = {"activations": activations, "rings": rings, "temporaries": temps, "statistics": stat_bytes,
              "captures": captures, "executor": executor, "similarity_peak": sim_peak, "cost_peak": cost_peak, "peak": peak,
              "host_peak_probe": p.peak.host, "device_peak_probe": p.peak.device}
    available = device_available(device) if device.type == "cuda" else host_available()
    where = f"{device} (device)" if device.type == "cuda" else "the host (cpu)"

    time_s: dict[str, float | None] = {"probe": p.probe_run_s * 2 if p.timed else p.probe_run_s}
    if p.call_s is not None:
        call_b = p.call_s * scale  # a call's time grows about linearly with the batch at these sizes
        fixed = max(0.0, p.probe_run_s - PROBE_STEPS * p.calls_per_step * p.call_s)
        run_s = fixed + sampler.steps * p.calls_per_step * call_b
        # the hooks' own time: one per module call in the similarity pass, two (a stopwatch, and the
        # executor's hook or the tracker) in the cost pass's hooked runs
        hook_s = time_hook_overhead(device, TimingConfig(warmup=2, repeats=5)) / 1e3
        module_calls = sampler.steps * p.calls_per_step * len(p.modules)
        stats_s = statistics_seconds(p, layout, lags, batch, token_sample, device) * sampler.steps
        time_s["statistics"] = weights["similarity"] * stats_s
        time_s["similarity"] = weights["similarity"] * (run_s + stats_s + module_calls * hook_s)
        # replay: each module alone (warmup + repeats) x (full, half) times, a sample lasting at least
        # min_sample_s on a CPU; a module's call taken as the call's time over the blocks
        n_blocks = max(1, sum(m.kind == "block" for m in p.modules))
        floor = 0.0 if device.type == "cuda" else timing.min_sample_s
        replay_s = weights["replay_calls"] * len(p.modules) * max(call_b / n_blocks, floor)
        time_s["cost"] = (weights["cost"] * run_s + replay_s + weights["hooked_cost_runs"] * module_calls * 2 * hook_s)
        time_s["total"] = time_s["probe"] + time_s["similarity"] + time_s["cost"]
    else:
        time_s.update(statistics=None, similarity=None, cost=None, total=None)

    fits, problem, fixes = None, None, []
    if available is not None:
        budget = FIT_FRACTION * available
        fits = peak <= budget
        if not fits:
            which = "similarity pass" if sim_peak >= cost_peak else "cost pass"
            problem = (f"the {which} needs about {fmt_bytes(peak)} on {where} "
                       f"(ring buffers {fmt_bytes(rings)}, activations {fmt_bytes(activations)}), "
                       f"{fmt_bytes(available)} are available")
            fixes = _fixes(p, batch, lags, token_sample, act / batch if batch else 0, stat_bytes,
                           (captures + executor) / batch if batch else 0, budget)
    if time_s.get("total") and time_s["total"] > LONG_RUN_S:
        fixes.append(f"--shard i/N: split the {samples} calibration samples over N processes or GPUs "
                     "(`planner profile merge` joins them)")
    return Estimate(
        model=runner.spec, device=str(device), steps=sampler.steps, samples=samples, batch=batch, chunks=chunks,
        lags=lags, token_sample=token_sample, max_tokens=p.max_tokens, costs=costs, calls=calls, runs=runs,
        time_s=time_s, memory=memory, available=available, available_where=where, host_available=host_available(),
        fits=fits, problem=problem,
        fixes=fixes, probe={"batch": p.batch, "run_s": p.probe_run_s, "call_s": p.call_s, "timed": p.timed,
                            "calls_per_step": p.calls_per_step, "modules": len(p.modules)},
    )


def _fixes(p: Probe, batch: int, lags: int, token_sample: int | None, act_per_sample: float, stat_bytes: int,
           cost_per_sample: float, budget: float) -> list[str]:
    """The options that make the run fit, most direct first."""

    def need(b: int, n: int | None, lg: int = lags) -> float:
        sim = act_per_sample * b + p.ring_bytes(b, lg, n) + p.temp_bytes(b, lg, n) + stat_bytes
        return max(sim, act_per_sample * b + cost_per_sample * b)

    fixes = []
    fitting_b = [b for b in range(batch - 1, 0, -1) if need(b, token_sample) <= budget]
    if fitting_b:
        fixes.append(f"--batch-size {fitting_b[0]}")
    tokens = p.max_tokens
    if tokens:
        candidates = [2**e for e in range(int(math.log2(tokens)), 3, -1) if 2**e < tokens and (token_sample is None or 2**e < token_sample)]
        for b in (batch, 1) if batch > 1 else (batch,):
            n_fit = next((n for n in candidates if need(b, n) <= budget), None)
            if n_fit is not None:
                fixes.append(f"--token-sample {n_fit}" if b == batch else f"--batch-size 1 --token-sample {n_fit}")
                break
    if not fixes and lags > 1 and need(1, token_sample, 1) <= budget:
        fixes.append("--batch-size 1 --lags 1")
    if not fixes:
        fixes.append("nothing fits on this device even at --batch-size 1 with token sampling: the activations of one "
                     "step alone are too large; use a device with more memory (--device)")
    return fixes


def check_fits(estimate: Estimate) -> None:
    """Raise a one-line PlannerError naming the fix when ``estimate`` does not fit."""
    if estimate.fits is False:
        raise PlannerError(f"this profile run would not fit: {estimate.problem}; use {' or '.join(estimate.fixes)} "
                           "(`--dry-run` shows the estimate)")


def check_token_sample(token_sample: int | None, max_tokens: int | None) -> None:
    """A token sample must be positive and below the largest token count, or it samples nothing."""
    if token_sample is None:
        return
    if token_sample < 1:
        raise PlannerError(f"--token-sample must be a positive number of tokens, got {token_sample}")
    if max_tokens is None:
        raise PlannerError("--token-sample: no module output of this model has a token axis ([batch, tokens, channels])")
    if token_sample >= max_tokens:
        raise PlannerError(f"--token-sample {token_sample} keeps every token (the model's outputs have at most {max_tokens}); "
                           f"give a number below {max_tokens}, or leave it out for exact statistics")
