"""``profile_model``: the similarity pass, then the cost pass, then the artifact."""

from __future__ import annotations

import dataclasses
import platform
from dataclasses import replace
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import planner
from planner.errors import PlannerError
from planner.modules import LEVEL_KINDS, class_name
from planner.profile.batching import micro_batch
from planner.profile.artifact import ModuleInfo, Profile, ProfileMeta, SCHEMA_VERSION, default_profile_name
from planner.profile.capture import foreign_hooks, resolve_modules
from planner.profile.flop_costs import NOMINAL_FLOPS_PER_MS, check_cost_source, flop_cost_table
from planner.profile.latency import LatencyModel
from planner.profile.similarity import similarity_stats
from planner.profile.tokens import token_sampler
from planner.profile.timing import (
    REUSE_COLUMNS,
    InContext,
    RunTimes,
    TimingConfig,
    capture_inputs,
    cost_table,
    median,
    module_flops,
    time_hook_overhead,
    time_modules,
    executor_hook_overhead,
    gc_paused,
    time_in_context,
    time_reuse_ops,
    quiet,
    time_runs,
)
from planner.pipelines.probe import check_layout
from planner.runner import Runner, Sampler, resolve_device


# How far the latency model's full run may miss the measured plain runs before the profile warns.
LATENCY_CHECK_TOLERANCE = 0.25


def device_info(device: torch.device) -> dict:
    """Type, human-readable name and CPU thread count of ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"type": device.type, "name": name, "threads": torch.get_num_threads()}


def _jsonable(obj: Any) -> Any:
    """Conditions as JSON: plain values as they are, tensors as shape, dtype and a content hash."""
    import hashlib

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        digest = hashlib.sha256(t.float().numpy().tobytes()).hexdigest()[:16]
        return {"tensor": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sha256_16": digest}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # a Prompt
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items() if v not in (None, ())}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (int, float, str, bool)):
        return obj
    return str(obj)


def prompt_set_digest(conditions: list[Any]) -> str | None:
    """The digest plans and profiles record of the prompts they were made on (``None`` without prompts)."""
    from planner.pipelines.prompts import Prompt, PromptSet

    prompts = [c for c in conditions if isinstance(c, Prompt)]
    return PromptSet(tuple(prompts), "calibration").digest if prompts else None


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, file=sys.stderr)


def profile_model(
    model: str | Runner = "digits-dit",
    sampler: Sampler | None = None,
    *,
    samples: int = 8,
    seed: int = 0,
    lags: int = 3,
    device: str = "auto",
    batch_size: int | None = None,
    timing: TimingConfig | None = None,
    costs: str = "measured",
    flops: bool = True,
    calibrate_executor: bool = True,
    probe: bool = True,
    out: str | Path | None = None,
    name: str | None = None,
    progress: bool = False,
    token_sample: int | None = None,
    token_seed: int = 0,
    shard=None,
    check_memory: bool = True,
) -> Profile:
    """Profile ``model`` (a zoo spec, a folder, or a loaded Runner) under ``sampler`` on ``samples``
    calibration inputs (conditions from the model's family, seeds ``seed .. seed+samples-1``).

    Promises: similarity statistics of every cacheable module for every step, CFG branch and lag
    1..``lags`` (plus the CFG comparison), streamed so that at most ``lags`` outputs per module and
    branch are held; module, reuse-op and fixed costs from a separate timing pass at a batch of
    ``min(samples, batch_size)``; a validated latency model. With ``calibrate_executor``
    the per-call overhead of the executor's hooks is measured by running it (otherwise a bare hook's).
    ``costs="flops"`` skips the timing pass: every cost is the module's FLOPs (fvcore) at a nominal
    rate, so the latency model predicts FLOP speedups, the same on every machine. With ``probe`` a
    short run first checks that the CFG layout the model's family claims is what the pipeline does
    (:mod:`planner.pipelines.probe`). Prompts are encoded before anything is timed. The model is left
    without any hook. With ``out`` the profile is also written there (a folder). Bad arguments raise
    PlannerError.

    Scale (see docs/scale.md): memory is one micro-batch's (``batch_size`` samples) ring buffers and
    activations whatever ``samples`` is; ``token_sample`` computes the similarity statistics on that
    many token positions (:mod:`planner.profile.tokens`); ``shard`` (``"i/N"``) profiles a contiguous
    slice of the samples into a partial profile that :func:`planner.profile.shard.merge_profiles`
    joins. With ``check_memory`` a short probe run first estimates the run's memory
    (:mod:`planner.profile.estimate`) and a run that would not fit is refused, naming the option
    that fixes it.
    """
    t_start = time.perf_counter()
    if samples < 1:
        raise PlannerError(f"samples must be at least 1, got {samples}")
    if lags < 1:
        raise PlannerError(f"lags must be at least 1, got {lags}")
    check_cost_source(costs)
    if batch_size is not None and batch_size < 1:
        raise PlannerError(f"batch_size must be at least 1, got {batch_size}")
    from planner.profile.shard import as_shard

    shard = as_shard(shard)
    sample_ids = shard.indices(samples) if shard is not None else list(range(samples))
    sampling = token_sampler(token_sample, token_seed)  # a bad number fails before the model loads
    if isinstance(model, Runner):
        runner = model
    else:
        from planner.runner import load_runner

        runner = load_runner(model, device=resolve_device(device))
    sampler = runner.resolve(sampler)
    components = runner.component_steps(sampler)  # several transformers (Wan 2.2): which runs which step
    layout = runner.cfg_layout(sampler)
    batch = micro_batch(runner, len(sample_ids), batch_size)
    cfg = timing or TimingConfig()
    warnings: list[str] = []
    foreign = foreign_hooks(runner.transformer)
    if foreign:
        warnings.append("hooks of other tools were attached while profiling: " + ", ".join(foreign[:5]))

    all_conditions = runner.conditions(samples, seed)
    conditions = [all_conditions[i] for i in sample_ids]
    seeds = [seed + i for i in sample_ids]
    runner.prepare(conditions)  # prompts encoded now: neither pass times the text encoders
    measured = check_layout(runner, sampler).to_dict() if probe else None
    modules = runner.modules()
    if not modules:
        raise PlannerError(f"{runner.spec}: no cacheable modules found in {type(runner.transformer).__name__}")

    t_probe = 0.0
    if check_memory:
        from planner.profile.estimate import check_fits, check_token_sample, estimate_profile, probe as probe_step

        t0 = time.perf_counter()
        found = probe_step(runner, modules, sampler, conditions[:batch], seeds[:batch], timed=False)
        check_token_sample(token_sample, found.max_tokens)
        check_fits(estimate_profile(runner, sampler, samples=len(sample_ids), batch_size=batch, lags=lags,
                                    token_sample=token_sample, costs=costs, timing=cfg, probe_result=found))
        t_probe = time.perf_counter() - t0

    n_chunks = -(-len(sample_ids) // batch)
    bar = _bar(sampler.steps * n_chunks, "similarity", progress)
    t0 = time.perf_counter()
    try:
        collector, timesteps, w = similarity_stats(runner, modules, sampler, conditions, seeds, k=lags, batch_size=batch,
                                                   token_sample=sampling, progress=bar)
    finally:
        bar.close()
    sim = collector.table(timesteps)
    warnings += w
    t_sim = time.perf_counter() - t0

    t0 = time.perf_counter()
    if costs == "flops":
        cost, latency, flops_meta, w, t_flops = _flop_costs(runner, modules, sampler, conditions[:batch], seeds[:batch])
    else:
        with gc_paused():
            cost, latency, flops_meta, w, t_flops = _cost_pass(
                runner, modules, sampler, conditions[:batch], seeds[:batch], cfg, flops, progress, calibrate_executor
            )
    warnings += w
    t_cost = time.perf_counter() - t0 - t_flops

    import diffusers

    meta = ProfileMeta(
        name=name or default_profile_name(runner.spec, sampler, str(runner.device)),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_spec=runner.spec,
        # a shard records the whole calibration set's prompts: the set its merged profile is of
        extra={"source": {"revision": runner.revision, "dtype": str(runner.dtype).removeprefix("torch."),
                          "prompt_set": prompt_set_digest(all_conditions)}, "probe": measured,
               **_scale_meta(sampling, shard, sample_ids, samples, collector),
               **({"components": components} if components else {})},
        model_class=class_name(runner.transformer),
        fingerprint=runner.fingerprint(),
        modules=tuple(
            ModuleInfo(m.name, m.kind, m.block, m.cls, m.name.rsplit(".", 1)[0] if m.kind != "block" else None) for m in modules
        ),
        sampler=sampler,
        cfg_layout=layout,
        branches=layout.branches,
        timesteps=tuple(timesteps),
        samples=len(sample_ids),
        seed=seed,
        seeds=tuple(seeds),
        conditions=tuple(_jsonable(c) for c in conditions),
        batch=batch,
        lags=lags,
        device=device_info(runner.device),
        versions={
            "planner": planner.__version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        durations_s={
            "probe": round(t_probe, 3),
            "similarity": round(t_sim, 3),
            "timing": round(t_cost, 3),
            "flops": round(t_flops, 3),
            "total": round(time.perf_counter() - t_start, 3),
        },
        timing={"source": "flops", "modules": "fvcore FLOPs of each module at the profile's batch, at a nominal "
                 f"{NOMINAL_FLOPS_PER_MS:g} FLOPs per ms"} if costs == "flops" else {
            "modules": "in context: a stopwatch hook around every module call in run_repeats full runs after a warm-up run; median over all calls",
            "reuse_ops": "replay of copy/add/extrapolate/concat on each module's output size; median of repeats after warm-up",
            "timer": "cuda events" if runner.device.type == "cuda" else "perf_counter",
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "run_repeats": cfg.run_repeats,
            "quiet_tolerance": cfg.quiet_tolerance,
            "rounds": "estimates pool the rounds whose run took at most (1 + quiet_tolerance) x the fastest round",
            "min_sample_s": cfg.min_sample_s,
        },
        latency=latency,
        flops=flops_meta,
        tables={},
        warnings=tuple(warnings),
        schema_version=SCHEMA_VERSION,
        **_scheduler_identity(runner, sampler),
    )
    profile = Profile(meta, sim, cost, raw=collector.raw() if shard is not None else None)
    if out is not None:
        profile.save(out)
    return profile


def _transformers(runner) -> int:
    """How many transformers the runner's pipeline runs (Wan 2.2: 2, of one architecture); each call runs one."""
    return len(getattr(runner.transformer, "component_names", ())) or 1


def _scheduler_identity(runner, sampler) -> dict:
    """The scheduler class and config hash a profile records (what a search checks it against)."""
    from planner.plan.build import config_hash

    sched = runner.scheduler_for(sampler)
    return {"scheduler_class": type(sched).__name__, "scheduler_config": config_hash(sched.config)}


def _scale_meta(sampling, shard, sample_ids: list[int], samples: int, collector) -> dict:
    """meta.json keys of a token-sampled or sharded profile (absent otherwise, so older profiles read the same)."""
    extra: dict = {"memory": {"ring_buffer_peak_bytes": int(collector.peak_ring_bytes)}, **collector.partial.to_meta()}
    if sampling is not None:
        extra["token_sample"] = sampling.to_dict()
    if shard is not None:
        extra["shard"] = {"index": shard.index, "count": shard.count, "samples": samples, "indices": list(sample_ids)}
    return extra


def _flop_costs(runner, modules, sampler, conds, seeds):
    """Costs from FLOPs alone (see :func:`profile_model`): a module costs its fvcore FLOPs, a reuse
    operation nothing (see :mod:`planner.profile.flop_costs`), the transformer outside its blocks the rest of its FLOPs;
    nothing outside the transformer. Returns what :func:`_cost_pass` returns."""
    layout = runner.cfg_layout(sampler)
    t0 = time.perf_counter()
    caps, top = capture_inputs(runner, modules, sampler, conds, seeds)
    flops, total, why = module_flops(runner.transformer, top, [m.name for m in modules])
    per_call = _transformers(runner)  # blocks of one transformer run per call
    if why or not all(np.isfinite(flops.get(m.name, np.nan)) for m in modules):
        raise PlannerError(f"{runner.spec}: cannot count FLOPs for a FLOP-based profile ({why or 'a module has none'})")
    t_flops = time.perf_counter() - t0
    lat = [{"latency_ms": 0.0, "latency_iqr_ms": 0.0, "latency_half_ms": 0.0} for _ in modules]
    reuse = [{col: 0.0 for col in REUSE_COLUMNS.values()} | {"out_numel": int(sum(t.numel() for t in cap.outputs))}
             for cap in caps]
    cost = flop_cost_table(cost_table(modules, lat, reuse, flops, layout, len(conds)), total, layout, per_call,
                           where=runner.spec)
    blocks = float(cost.loc[cost.kind == "block", "flops"].sum()) / per_call
    call_fixed_ms = float(cost.loc[(cost.kind == "fixed") & (cost.scope == "call"), "self_ms"].sum())
    model = LatencyModel.from_cost_table(cost, layout, sampler.steps, 0.0, components=runner.component_steps(sampler))
    latency = {"source": "flops", "nominal_flops_per_ms": NOMINAL_FLOPS_PER_MS, "call_fixed_ms": call_fixed_ms,
               "step_fixed_ms": 0.0, "run_fixed_ms": 0.0, "decode_ms": 0.0, "hook_ms": 0.0,
               "blocks_ms": blocks / NOMINAL_FLOPS_PER_MS, "predicted_run_s": model.predict_run(None)}
    flops_meta = {"unit": "fvcore counts (one multiply-add = 1), per transformer call at the profile's batch",
                  "transformer": total, "cached_modules_share": blocks / total if total else None}
    return cost, latency, flops_meta, [], t_flops


def _quiet_rounds(rounds: list[InContext], n_modules: int, tolerance: float) -> tuple[InContext, int]:
    """The rounds whose run took at most ``1 + tolerance`` times the fastest one, merged.

    A shared machine only ever slows a run down (other tenants, frequency); the fastest rounds are
    the reproducible ones, and mixing in a slow stretch would skew every estimate by its slowdown.
    """
    merged = InContext.empty(n_modules)
    totals = [r.run[0] if r.run else float("inf") for r in rounds]
    if not rounds:
        return merged, 0
    fastest = min(totals)
    used = [r for r, t in zip(rounds, totals) if t <= fastest * (1 + tolerance)] or rounds
    for r in used:
        merged.extend(r)
    return merged, len(used)


def _stats_ms(times: list[float]) -> tuple[float, float]:
    if not times:
        return float("nan"), float("nan")
    q1, med, q3 = np.percentile(times, [25, 50, 75])
    return float(med) * 1e3, float(q3 - q1) * 1e3


def _cost_pass(runner, modules, sampler, conds, seeds, cfg: TimingConfig, want_flops: bool, progress: bool,
               want_executor: bool = True):
    """In-context module timings, reuse ops, hook overhead, clean runs and FLOPs -> (cost table,
    latency meta, flops meta, warnings, seconds spent on FLOPs)."""
    layout = runner.cfg_layout(sampler)
    device = runner.device
    transformer = runner.transformer
    warnings: list[str] = []
    bar = _bar(cfg.run_repeats + 2, "timing", progress)
    n = len(conds)
    one = replace(cfg, run_repeats=1)
    # Batched CFG: half the samples with CFG on gives every module call exactly one branch's batch.
    half_in_context = layout.batched and n >= 2 and n % 2 == 0
    try:
        caps, top = capture_inputs(runner, modules, sampler, conds, seeds)  # also the warm-up run
        reuse = time_reuse_ops(caps, layout, device, cfg)
        hook_ms = time_hook_overhead(device, cfg)
        bar.update(1)
        rounds_full: list[InContext] = []
        rounds_half: list[InContext] = []
        runs = RunTimes()
        has_vae = getattr(runner.pipe, "vae", None) is not None
        # Interleaved rounds: the machine's speed drifts, and every estimate (module times, fixed
        # costs, the plain runs the model is checked against) should sample the same stretches.
        for _ in range(cfg.run_repeats):
            rounds_full.append(time_in_context(runner, modules, sampler, conds, seeds, one))
            if half_in_context:
                rounds_half.append(time_in_context(runner, modules, sampler, conds[: n // 2], seeds[: n // 2], one))
            runs.extend(time_runs(runner, sampler, conds, seeds, one, with_latent=has_vae))
            bar.update(1)
        ctx, used_full = _quiet_rounds(rounds_full, len(modules), cfg.quiet_tolerance)
        half, _ = _quiet_rounds(rounds_half, len(modules), cfg.quiet_tolerance)
        lat = []
        for times in ctx.modules:
            med, iqr = _stats_ms(times)
            lat.append({"latency_ms": med, "latency_iqr_ms": iqr, "latency_half_ms": med})
        half_method = "same as full (one branch per call)"
        if half_in_context:
            for row, times in zip(lat, half.modules):
                row["latency_half_ms"] = _stats_ms(times)[0]
            half_method = "in-context runs with half the samples"
        elif layout.batched:
            replay, w = time_modules(modules, resolve_modules(transformer, modules), caps, layout, device, cfg)
            warnings += w
            for row, r in zip(lat, replay):
                ratio = r["latency_half_ms"] / r["latency_ms"] if r["latency_ms"] > 0 else 0.5
                row["latency_half_ms"] = row["latency_ms"] * ratio
            half_method = "in-context full time x (replayed half batch / replayed full batch)"
        bar.update(1)
    finally:
        bar.close()

    t0 = time.perf_counter()
    flops, total_flops, why = module_flops(transformer, top, [m.name for m in modules]) if want_flops else ({}, float("nan"), "not asked for")
    t_flops = time.perf_counter() - t0
    if why and want_flops:
        warnings.append(why)
    del caps, top

    cost = cost_table(modules, lat, reuse, flops, layout, len(conds))
    clean_s = median(quiet(runs.clean, cfg.quiet_tolerance))
    blocks_ms = float(cost.loc[cost.kind == "block", "latency_ms"].sum()) / _transformers(runner)  # per call
    call_ms = median(ctx.call) * 1e3
    # Paired differences (call minus its blocks, ...) keep load bursts from skewing a fixed cost.
    call_fixed_ms = median(ctx.call_fixed) * 1e3 if ctx.call_fixed else call_ms - blocks_ms
    step_fixed_ms = median(ctx.step_fixed) * 1e3 if ctx.step_fixed else 0.0
    run_fixed_ms = median(ctx.run_fixed) * 1e3 if ctx.run_fixed else 0.0
    decode_ms = max(0.0, (clean_s - median(quiet(runs.latent, cfg.quiet_tolerance))) * 1e3) if runs.latent else 0.0
    for label, value in (("transformer outside its blocks", call_fixed_ms), ("step outside the transformer", step_fixed_ms),
                         ("run outside the loop", run_fixed_ms)):
        if not value >= 0:
            warnings.append(f"measured cost of the {label} came out {value:.3f} ms (machine load?); counted as 0")
    call_fixed_ms, step_fixed_ms, run_fixed_ms = (max(0.0, v) if np.isfinite(v) else 0.0 for v in (call_fixed_ms, step_fixed_ms, run_fixed_ms))
    decode_ms = min(decode_ms, run_fixed_ms)
    batch = int(cost.batch.iloc[0]) if len(cost) else len(conds)
    fixed_rows = [
        ("<outside blocks>", "call", call_fixed_ms, "embeddings, final layer and everything else of a transformer call outside its blocks"),
        ("<outside transformer>", "step", step_fixed_ms, "scheduler step and CFG combination"),
        ("<outside loop>", "run", run_fixed_ms - decode_ms, "noise, conditioning, pipeline set-up"),
        ("<vae decode>", "run", decode_ms, "VAE decode of the final latents"),
    ]
    fixed = pd.DataFrame(
        [
            {"module": name, "kind": "fixed", "block": -1, "parent": "", "scope": scope, "batch": batch,
             "latency_ms": ms, "latency_iqr_ms": float("nan"), "latency_half_ms": ms, "self_ms": ms, "self_half_ms": ms}
            for name, scope, ms, _ in fixed_rows
        ]
    )
    cost = pd.concat([cost, fixed], ignore_index=True)
    cost["hook_ms"] = np.where(cost.kind == "fixed", np.nan, hook_ms)
    hook_method = "bare diffusers hook (pass-through) per call"
    if want_executor:
        per_group, w = executor_hook_overhead(runner, modules, sampler, conds, seeds)
        warnings += w
        for group, ms in per_group.items():
            rows = cost.kind.isin(LEVEL_KINDS[group])
            if not ms >= hook_ms:
                warnings.append(f"executor hook overhead of {group}s measured {ms * 1e3:.1f} us (machine load?); using the bare hook's")
                ms = hook_ms
            cost.loc[rows, "hook_ms"] = ms
        if per_group:
            hook_method = "planner.executor: each call timed outside minus inside its hook, median over calls and modules, per group: " + ", ".join(
                f"{g} {v * 1e3:.1f} us" for g, v in per_group.items())
    model = LatencyModel.from_cost_table(cost, layout, sampler.steps, hook_ms, components=runner.component_steps(sampler))
    predicted = model.predict_run(None)
    relative_error = (predicted - clean_s) / clean_s if clean_s > 0 else float("nan")
    if abs(relative_error) > LATENCY_CHECK_TOLERANCE:
        warnings.append(f"the latency model predicts a full run at {predicted * 1e3:.1f} ms, the plain runs took "
                        f"{clean_s * 1e3:.1f} ms ({relative_error:+.0%}; machine load?): predicted speedups "
                        f"are unreliable, profile again on a quiet machine")
    latency = {
        "call_ms": call_ms,
        "step_ms": median(ctx.step) * 1e3 if ctx.step else float("nan"),
        "call_fixed_ms": call_fixed_ms,
        "step_fixed_ms": step_fixed_ms,
        "run_fixed_ms": run_fixed_ms,
        "decode_ms": decode_ms,
        "hook_ms": hook_ms,
        "blocks_ms": blocks_ms,
        "timed_run_s": median(ctx.run),
        "measured_run_s": clean_s,
        "measured_runs_s": [round(x, 6) for x in runs.clean],
        "rounds_used": f"{used_full} of {cfg.run_repeats}",
        "quiet_tolerance": cfg.quiet_tolerance,
        "predicted_run_s": predicted,
        "relative_error": relative_error,
        "fixed_notes": {name: note for name, _, _, note in fixed_rows},
        "half_batch_method": half_method,
        "hook_method": hook_method,
    }
    flops_meta = {
        "unit": "fvcore counts (one multiply-add = 1), per transformer call at the profile's batch",
        "transformer": total_flops if np.isfinite(total_flops) else None,
        "cached_modules_share": (
            float(cost.loc[cost.kind == "block", "flops"].sum() / _transformers(runner) / total_flops) if np.isfinite(total_flops) and total_flops else None
        ),
    }
    return cost, latency, flops_meta, warnings, t_flops
