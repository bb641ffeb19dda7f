"""Benchmark of the cache-plan executor (issue 4), on digits-dit by default.

Prints:
1. executor overhead: an all-``compute`` plan applied vs no plan (target <= 2% of run time);
2. realized speedup of a plan that skips half the block compute (every block reuses its residual
   at every other step, steps 1, 3, 5, ...) vs the latency model's prediction (target >= 90%);
   the prediction comes from ``planner.profile``'s latency model, profiled at the same batch;
3. ``torch.compile`` of the transformer with a mixed plan applied (reuse, reuse_residual,
   forecast, share_cfg): max difference to eager with the same plan, graph breaks, unique graphs.

Runs with and without a plan alternate, so both see the same machine load; each figure is the
median of ``--repeats`` runs (the fastest-run ratio is printed too: load only ever slows a run).
The overhead is also measured per transformer call, alternating calls of the model and of a twin
carrying the plan, which is far less sensitive to a busy machine. ``--threads`` defaults to 1: on a small shared CPU, intra-op threads
waiting on a busy core make timings swing by 10x (every op can stall for a scheduler tick).

    python benchmarks/executor_bench.py [--batch 16] [--steps 50] [--repeats 9] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from planner.executor import apply_plan  # noqa: E402
from planner.plan import plan_for_runner  # noqa: E402
from _results import finish  # noqa: E402
from planner.runner import Sampler, load_runner  # noqa: E402


def _timed(runner, conds, seeds, sampler) -> float:
    t0 = time.perf_counter()
    runner.run(conds, seeds, sampler, output="latent")
    return time.perf_counter() - t0


def _interleaved(runner, conds, seeds, sampler, plan, repeats):
    """(no-plan seconds, plan seconds) lists from alternating runs (the order flips every pair)."""
    base, planned = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            if which == 0:
                base.append(_timed(runner, conds, seeds, sampler))
            else:
                with apply_plan(runner, plan):
                    planned.append(_timed(runner, conds, seeds, sampler))
    return base, planned


def _per_call_overhead(runner, conds, seeds, sampler, plan, calls):
    """Transformer calls with the plan applied vs a twin without, alternating call by call (fine-grained
    interleaving averages out machine load): median per-call time of each and their difference."""
    import copy

    captured = []
    hook = runner.transformer.register_forward_pre_hook(
        lambda m, a, kw: captured.append((a, dict(kw))) if not captured else None, with_kwargs=True
    )
    try:
        runner.run(conds, seeds, Sampler(sampler.scheduler, 1, sampler.guidance), output="latent")
    finally:
        hook.remove()
    args, kwargs = captured[0]
    twin = copy.deepcopy(runner.transformer)
    timesteps = plan.sampler.timesteps or [1000.0 - 10 * k for k in range(plan.steps)]
    t_template = kwargs["timestep"]
    bare, hooked = [], []
    with torch.no_grad(), apply_plan(twin, plan):
        for i in range(calls):
            kwargs["timestep"] = torch.full_like(t_template, timesteps[i % plan.steps])
            for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                model = runner.transformer if which == 0 else twin
                t0 = time.perf_counter()
                model(*args, **kwargs)
                (bare if which == 0 else hooked).append(time.perf_counter() - t0)
    b, h = statistics.median(bare), statistics.median(hooked)
    return {"per_call_no_plan_ms": b * 1e3, "per_call_all_compute_ms": h * 1e3, "per_call_overhead_pct": 100 * (h / b - 1)}


def half_block_plan(runner, sampler):
    """Every block reuses its residual at steps 1, 3, 5, ...: half of all block computes skipped."""
    codes = "".join("D" if k % 2 else "C" for k in range(sampler.steps))
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    return plan_for_runner(runner, sampler, {b: codes for b in blocks}, strategy="benchmark:half-blocks")


def mixed_plan(runner, sampler):
    """A plan using every action (for the torch.compile check)."""
    n = sampler.steps
    blocks = [m.name for m in runner.modules() if m.kind == "block"]
    subs = [m.name for m in runner.modules() if m.kind != "block"]
    alt = "".join("RC"[k % 2] if k else "C" for k in range(n))
    dec = {
        blocks[1]: "".join("DC"[k % 2] if k else "C" for k in range(n)),
        blocks[3]: "CC" + "".join("FC"[k % 2] for k in range(n - 2)),
        subs[0]: alt,
        subs[-1]: {"cond": "C" * n, "uncond": "C" + "S" * (n - 2) + "C"} if runner.cfg_layout(sampler) != "none" else alt,
    }
    return plan_for_runner(runner, sampler, dec, strategy="benchmark:mixed")


def _predict(runner, sampler, plan, batch):
    """(predicted speedup, how, seconds profiling): the latency model of a profile made at this batch."""
    from planner.profile import profile_model

    profile = profile_model(runner, sampler, samples=batch, lags=1, flops=False, progress=False)
    return profile.latency_model().predict_speedup(plan), "planner.profile latency model", profile.meta.durations_s.get("total")


def _compile_check(runner, sampler, conds, seeds):
    import torch._dynamo
    from torch._dynamo.utils import counters

    plan = mixed_plan(runner, sampler)
    with apply_plan(runner, plan):
        eager = runner.run(conds, seeds, sampler, output="latent")
    original = runner.pipe.transformer
    torch._dynamo.reset()
    counters.clear()
    with apply_plan(original, plan) as handle:
        runner.pipe.transformer = torch.compile(original)
        try:
            t0 = time.perf_counter()
            first = runner.run(conds, seeds, sampler, output="latent")
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            second = runner.run(conds, seeds, sampler, output="latent")
            t_second = time.perf_counter() - t0
        finally:
            runner.pipe.transformer = original
        stats = handle.stats()
    breaks = dict(counters.get("graph_break", {}))
    return {
        "steps": sampler.steps,
        "max_abs_diff_vs_eager": float((first - eager).abs().max()),
        "max_abs_eager": float(eager.abs().max()),
        "second_run_equal_first": bool(torch.equal(first, second)),
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": len(breaks),
        "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
        "first_run_s": t_first,
        "second_run_s": t_second,
        "fallbacks": stats["fallbacks"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=16, help="samples per run (CFG doubles the transformer batch)")
    ap.add_argument("--repeats", type=int, default=11, help="runs per figure and variant (median)")
    ap.add_argument("--calls", type=int, default=300, help="transformer calls per variant for the per-call overhead")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    ap.add_argument("--compile-steps", type=int, default=10, help="steps of the torch.compile check (0 skips it)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runner = load_runner(args.model)
    sampler = runner.resolve(Sampler(args.scheduler, args.steps, args.guidance))
    conds, seeds = runner.conditions(args.batch), list(range(args.batch))
    _timed(runner, conds, seeds, sampler)  # warm-up

    # 1. overhead of an all-compute plan
    identity = plan_for_runner(runner, sampler)
    base, planned = _interleaved(runner, conds, seeds, sampler, identity, args.repeats)
    reference = runner.run(conds[:2], seeds[:2], sampler, output="latent")
    with apply_plan(runner, identity):
        exact = torch.equal(runner.run(conds[:2], seeds[:2], sampler, output="latent"), reference)
    per_call = _per_call_overhead(runner, conds, seeds, sampler, identity, args.calls)
    overhead = {
        "no_plan_s": statistics.median(base),
        "all_compute_s": statistics.median(planned),
        "overhead_pct": 100 * (statistics.median(planned) / statistics.median(base) - 1),
        "min_overhead_pct": 100 * (min(planned) / min(base) - 1),
        "paired_overhead_pct": 100 * statistics.median(p / b - 1 for p, b in zip(planned, base)),
        **per_call,
        "bit_identical_to_no_plan": exact,
    }

    # 2. half of the block compute skipped: realized vs predicted
    plan = half_block_plan(runner, sampler)
    predicted, source, profile_s = _predict(runner, sampler, plan, args.batch)
    base, planned = _interleaved(runner, conds, seeds, sampler, plan, args.repeats)
    with apply_plan(runner, plan) as h:
        runner.run(conds[:2], seeds[:2], sampler, output="latent")
        computed = h.stats()["computed_fraction"]
    realized = statistics.median(base) / statistics.median(planned)
    half = {
        "plan": "every block: reuse_residual at odd steps",
        "computed_fraction": computed,
        "no_plan_s": statistics.median(base),
        "plan_s": statistics.median(planned),
        "realized_speedup": realized,
        "realized_speedup_fastest_runs": min(base) / min(planned),
        "predicted_speedup": predicted,
        "realized_over_predicted": realized / predicted,
        "prediction_source": source,
        "profile_s": profile_s,
    }

    out = {
        "model": args.model,
        "sampler": sampler.to_dict(),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "overhead": overhead,
        "half_blocks": half,
    }
    if args.compile_steps:
        csampler = Sampler(sampler.scheduler, args.compile_steps, sampler.guidance)
        out["compile"] = _compile_check(runner, csampler, conds, seeds)

    def render():
        o, h = out["overhead"], out["half_blocks"]
        print(f"{args.model}, {args.scheduler} {args.steps} steps, guidance {args.guidance:g}, batch {args.batch}, "
              f"{out['threads']} threads, median of {args.repeats} interleaved runs")
        print(f"overhead of an all-compute plan (target <= 2%): runs {o['no_plan_s'] * 1e3:.1f} ms -> {o['all_compute_s'] * 1e3:.1f} ms = "
              f"{o['overhead_pct']:+.2f}% (fastest runs {o['min_overhead_pct']:+.2f}%, paired median {o['paired_overhead_pct']:+.2f}%); "
              f"per transformer call {o['per_call_no_plan_ms']:.3f} ms -> {o['per_call_all_compute_ms']:.3f} ms = {o['per_call_overhead_pct']:+.2f}%; "
              f"outputs bit-identical: {o['bit_identical_to_no_plan']}")
        print(f"half the block compute skipped ({h['plan']}, computed fraction {h['computed_fraction']:.3f}): "
              f"{h['no_plan_s'] * 1e3:.1f} ms -> {h['plan_s'] * 1e3:.1f} ms, realized {h['realized_speedup']:.3f}x vs predicted "
              f"{h['predicted_speedup']:.3f}x = {100 * h['realized_over_predicted']:.1f}% (target >= 90%; prediction: {h['prediction_source']})")
        if "compile" in out:
            c = out["compile"]
            print(f"torch.compile with a mixed plan ({c['steps']} steps): max |compiled - eager| {c['max_abs_diff_vs_eager']:.2e} "
                  f"(outputs up to {c['max_abs_eager']:.2f}), {c['graph_breaks']} graph breaks ({c['graph_break_reasons']} distinct reasons), "
                  f"{c['unique_graphs']} unique graphs; first run {c['first_run_s']:.1f} s, second {c['second_run_s']:.2f} s")

    return finish("executor", out, render, args.json, args.results)


if __name__ == "__main__":
    sys.exit(main())
