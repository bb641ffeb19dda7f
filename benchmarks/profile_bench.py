"""Benchmark of the profiler and its latency model (issue 3).

Prints:
1. how long ``profile_model`` takes on digits-dit, 50 DDIM steps, guidance 3, 8 samples;
2. the latency model's error on the measured full-run time (fresh runs, not the profile's own);
3. its error on runs where half of the modules are skipped: (a) every other block, (b) the
   attention of even blocks and the MLP of odd blocks; both reuse at every step after the first.

Skipped runs are measured with ``planner.executor.apply_plan`` when it is importable and works
(the executor really runs the plan, cache reads and all); otherwise by replacing the skipped
modules' forward with the identity through a hook (said so in the output). The full run and the
two plans are timed round-robin, so all three see the same machine load. A shared machine only
ever slows runs down, so (as the profiler does) only the rounds whose plain run is within
``--quiet-tolerance`` of the fastest count; each figure is the median over those, and the error
against the median of all rounds is printed alongside.

The machine is shared: the script reports how much CPU *other* processes used while it profiled and
measured (from /proc/stat minus its own CPU time). Above a few percent the figures mean little;
``--wait-quiet S`` waits up to S seconds for the other processes to go quiet first.

    python benchmarks/profile_bench.py [--repeats 7] [--out profiles/NAME] [--json] [--wait-quiet 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import finish  # noqa: E402

import torch  # noqa: E402
from diffusers.hooks import ModelHook  # noqa: E402

from planner.profile import profile_model  # noqa: E402
from planner.profile.capture import attach, detach_hooks  # noqa: E402
from planner.runner import Sampler, load_runner  # noqa: E402


class CpuShare:
    """CPU share of *other* processes over a stretch of wall time: all busy CPU time from /proc/stat
    minus this process's own, divided by wall time x CPU count (None where /proc/stat is missing)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        t = os.times()
        return sum(fields) - idle, time.perf_counter(), t.user + t.system

    def others(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (end[0] - self.start[0]) / hz
        wall = end[1] - self.start[1]
        mine = end[2] - self.start[2]
        return max(0.0, (busy - mine) / (wall * (os.cpu_count() or 1))) if wall > 0 else None


def wait_quiet(limit_s: float, threshold: float = 0.1) -> float | None:
    """Wait (up to ``limit_s``) until other processes use under ``threshold`` of the CPUs over 2 s."""
    deadline = time.monotonic() + limit_s
    while True:
        probe = CpuShare()
        time.sleep(2.0)
        share = probe.others()
        if share is None or share < threshold or time.monotonic() > deadline:
            return share


class _SkipAfterFirst(ModelHook):
    """Identity forward (returns the hidden-states input) on every call but the first of a run."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        if self.calls == 1:
            return self.fn_ref.original_forward(*args, **kwargs)
        return kwargs.get("hidden_states", args[0] if args else None)


def _plan(runner, sampler, names):
    from planner.plan import plan_for_runner

    codes = "C" + "R" * (sampler.steps - 1)
    return plan_for_runner(runner, sampler).with_decisions({n: codes for n in names})


def _timed_with(runner, conds, seeds, sampler, names, method) -> float:
    """Seconds of one run with ``names`` skipped after step 0 (no names: the plain model)."""
    handle = hs = None
    if names and method == "apply_plan":
        from planner.executor import apply_plan

        handle = apply_plan(runner, _plan(runner, sampler, names))
    elif names:
        mods = dict(runner.transformer.named_modules())
        hs = attach(runner.transformer, [(mods[n], _SkipAfterFirst(), f"bench.skip.{n}") for n in names])
    try:
        t0 = time.perf_counter()
        runner.run(conds, seeds, sampler, output="image")
        return time.perf_counter() - t0
    finally:
        if handle is not None:
            handle.remove()
        if hs is not None:
            detach_hooks(runner.transformer, hs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits-dit")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="measured runs per figure (median)")
    ap.add_argument("--method", choices=("auto", "apply_plan", "identity"), default="auto")
    ap.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--quiet-tolerance", type=float, default=0.1,
                    help="rounds whose plain run is slower than the fastest by more than this are left out (as in the profile)")
    ap.add_argument("--out", default=None, help="also write the profile to this folder")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    quiet_share = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    share = CpuShare()
    t0 = time.perf_counter()
    runner = load_runner(args.model)
    t_load = time.perf_counter() - t0
    sampler = Sampler(args.scheduler, args.steps, args.guidance)
    profile = profile_model(runner, sampler, samples=args.samples, out=args.out, progress=not args.json)
    t_profile = time.perf_counter() - t0
    others_profile = share.others()
    model = profile.latency_model()
    conds = runner.conditions(args.samples, 0)[: profile.meta.batch]
    seeds = list(profile.meta.seeds[: profile.meta.batch])

    blocks = [m for m in profile.meta.modules if m.kind == "block"]
    subs = [m for m in profile.meta.modules if m.kind != "block"]
    scenarios = {
        "every other block": [b.name for b in blocks[1::2]],
        "attn of even blocks + mlp of odd blocks": [
            m.name for m in subs if (m.kind == "attn" and m.block % 2 == 0) or (m.kind == "mlp" and m.block % 2 == 1)
        ],
    }
    method = args.method
    if method == "auto":
        try:
            _timed_with(runner, conds, seeds, Sampler(args.scheduler, 2, args.guidance), scenarios["every other block"][:1], "apply_plan")
            method = "apply_plan"
        except Exception as exc:  # the executor is absent or cannot run this plan: fall back, and say so
            print(f"note: apply_plan unusable ({type(exc).__name__}: {exc}); skipping modules with identity hooks", file=sys.stderr)
            method = "identity"

    share = CpuShare()
    times: dict[str, list[float]] = {"full": [], **{k: [] for k in scenarios}}
    for _ in range(args.repeats):
        times["full"].append(_timed_with(runner, conds, seeds, sampler, [], method))
        for label, names in scenarios.items():
            times[label].append(_timed_with(runner, conds, seeds, sampler, names, method))
    others_measure = share.others()
    # The same rule as the profile's: a shared machine only slows runs down, so the rounds whose
    # plain run is within --quiet-tolerance of the fastest are the comparable ones.
    fastest = min(times["full"])
    keep = [i for i, t in enumerate(times["full"]) if t <= fastest * (1 + args.quiet_tolerance)]
    measured = {k: statistics.median(v[i] for i in keep) for k, v in times.items()}
    measured_all = {k: statistics.median(v) for k, v in times.items()}

    predicted_full = model.predict_run(None)
    results = []
    for label, names in scenarios.items():
        predicted = model.predict_run(_plan(runner, sampler, names))
        results.append(
            {
                "scenario": label,
                "modules_skipped": len(names),
                "modules_total": len(profile.meta.modules),
                "measured_s": measured[label],
                "predicted_s": predicted,
                "error": (predicted - measured[label]) / measured[label],
                "measured_all_rounds_s": measured_all[label],
                "error_all_rounds": (predicted - measured_all[label]) / measured_all[label],
                "measured_speedup": measured["full"] / measured[label],
                "predicted_speedup": predicted_full / predicted,
            }
        )
    out = {
        "model": args.model,
        "sampler": sampler.to_dict(),
        "samples": args.samples,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "other_processes_cpu_share": {"before": quiet_share, "profiling": others_profile, "measuring": others_measure},
        "load_s": t_load,
        "profile_s": profile.meta.durations_s["total"],
        "profile_wall_s": t_profile,
        "profile_durations_s": profile.meta.durations_s,
        "full_run": {"measured_s": measured["full"], "predicted_s": predicted_full,
                     "error": (predicted_full - measured["full"]) / measured["full"],
                     "measured_all_rounds_s": measured_all["full"],
                     "error_all_rounds": (predicted_full - measured_all["full"]) / measured_all["full"]},
        "rounds_used": f"{len(keep)} of {args.repeats}",
        "runs_s": times,
        "skip_method": method,
        "half_skipped": results,
        "latency_meta": {k: v for k, v in profile.meta.latency.items() if k != "fixed_notes"},
    }
    def render():

        def pct(x):
            return "n/a" if x is None else f"{100 * x:.0f}%"

        print(f"profile of {args.model} ({args.scheduler} {args.steps} steps, guidance {args.guidance:g}, {args.samples} samples, "
              f"{torch.get_num_threads()} threads): {out['profile_s']:.1f} s (+{t_load:.1f} s model load)  "
              f"[similarity {profile.meta.durations_s['similarity']:.1f} s, timing {profile.meta.durations_s['timing']:.1f} s, "
              f"flops {profile.meta.durations_s['flops']:.1f} s]")
        print(f"other processes used {pct(others_profile)} of the {os.cpu_count()} CPUs while profiling, {pct(others_measure)} while measuring")
        print(f"measured rounds used: {out['rounds_used']} (plain run within {100 * args.quiet_tolerance:.0f}% of the fastest); "
              "in brackets: the error against the median of all rounds")
        f = out["full_run"]
        print(f"full run:      measured {f['measured_s'] * 1e3:8.1f} ms  predicted {f['predicted_s'] * 1e3:8.1f} ms  "
              f"error {100 * f['error']:+.1f}%  [{100 * f['error_all_rounds']:+.1f}%]")
        how = "planner.executor.apply_plan" if method == "apply_plan" else "identity hooks on the skipped modules (no executor)"
        print(f"half skipped (steps 1..{args.steps - 1}, measured with {how}):")
        for r in results:
            print(f"  {r['scenario']:<40} measured {r['measured_s'] * 1e3:8.1f} ms  predicted {r['predicted_s'] * 1e3:8.1f} ms  "
                  f"error {100 * r['error']:+.1f}%  [{100 * r['error_all_rounds']:+.1f}%]   speedup measured {r['measured_speedup']:.2f}x predicted {r['predicted_speedup']:.2f}x")

    return finish("profile", out, render, args.json, args.results)


if __name__ == "__main__":
    sys.exit(main())
