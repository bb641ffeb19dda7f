"""How far a realized speedup can be trusted: the bench's timer run in several sessions on one machine.

Times the same contenders (the suite's greedy plans for digits-dit, diffusers' TaylorSeer at three
intervals, 25 sampling steps) against full compute in ``--sessions`` timing sessions of ``--rounds``
rounds each, with a full-compute run after every contender and after every fourth
(``reference_every`` 1 and 4, alternating session by session). For each spacing it reports how much a
speedup moves from session to session (its relative standard deviation, averaged over the
contenders) under several estimators read off the same runs, for the first 3 rounds and for all,
next to the standard error that ``planner.evaluate.timing_noise`` states from within one session.
What it answers: which estimator and which spacing the timer should use, and whether its stated
noise is honest.

    python benchmarks/timing_noise.py [--sessions 5] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _results import finish  # noqa: E402

NAME = "timing_noise"
PLANS = Path(__file__).resolve().parent / "results" / "bench-suite-v8" / "digits-dit" / "plans"
SPACINGS = (1, 4)


def _ratios(timing, rounds: int) -> list[float]:
    return [r / s for r, s in zip(timing.reference_seconds[:rounds], timing.seconds[:rounds])]


# Ways to read one contender's speedup off a session (its Timing and all the reference runs).
ESTIMATORS = {
    "median of paired ratios (the timer's)": lambda t, ref, k: statistics.median(_ratios(t, k)),
    "mean of paired ratios": lambda t, ref, k: statistics.fmean(_ratios(t, k)),
    "ratio of medians": lambda t, ref, k: statistics.median(ref) / statistics.median(t.seconds[:k]),
    "ratio of fastest runs": lambda t, ref, k: min(ref) / min(t.seconds[:k]),
}


def contenders(runner, sampler, conditions, seeds):
    """The timed methods: four greedy plans, TaylorSeer at intervals 2 - 4, 25 sampling steps."""
    from planner.bench.peers import peer_runs
    from planner.evaluate import Contender
    from planner.executor import apply_plan
    from planner.plan import load_plan
    from planner.runner import Sampler

    out = {}
    for name in ("greedy-1.5x", "greedy-2x-flops", "greedy-2x", "greedy-3x"):
        plan = load_plan(PLANS / f"{name}.json")
        out[name] = Contender(lambda: runner.run(conditions, seeds, sampler),
                              context=lambda plan=plan: apply_plan(runner.pipe, plan))
    peers, _ = peer_runs(runner, sampler, ["diffusers-taylorseer"], {"diffusers-taylorseer": [2, 3, 4]})
    for p in peers:
        out[f"taylorseer {p.setting}"] = Contender(lambda p=p: p.run(conditions, seeds, sampler))
    fewer = runner.resolve(Sampler(sampler.scheduler, sampler.steps // 2, sampler.guidance))
    out[f"{fewer.steps} steps"] = Contender(lambda: runner.run(conditions, seeds, fewer))
    return out


def measure(sessions: int, rounds: int, timed_seeds: int) -> dict:
    """Every session's timed runs per spacing, and the spreads of each estimator across sessions."""
    import torch

    from planner.evaluate import Contender, time_against_reference, timing_noise
    from planner.runner import load_runner
    from planner.seeds import evaluation_seeds

    torch.set_num_threads(1)
    runner = load_runner("digits-dit")
    sampler = runner.resolve(None)
    seeds = evaluation_seeds(timed_seeds)
    conditions = runner.conditions(len(seeds), seed=seeds[0])
    runs = contenders(runner, sampler, conditions, seeds)
    reference = Contender(lambda: runner.run(conditions, seeds, sampler))
    timed = {every: [] for every in SPACINGS}
    for s in range(sessions):
        for every in SPACINGS if s % 2 == 0 else SPACINGS[::-1]:
            start = time.perf_counter()
            timed[every].append((time_against_reference(reference, runs, repeats=rounds, warmup=1 if s == 0 else 0,
                                                         reference_every=every), time.perf_counter() - start))
    result = {"sessions": sessions, "rounds": rounds, "timed_seeds": timed_seeds, "contenders": list(runs),
              "spacings": {}}
    for every, got in timed.items():
        entry = {"seconds_per_session": statistics.fmean(w for _, w in got), "estimators": {}, "stated_se": {},
                 "speedups": {name: [t.timings[name].speedup for t, _ in got] for name in runs}}
        for k in sorted({min(3, rounds), rounds}):
            entry["estimators"][k] = {label: _between_sessions(f, got, runs, k) for label, f in ESTIMATORS.items()}
            stated = [timing_noise({n: _first(t.timings[n], k) for n in runs}) for t, _ in got]
            entry["stated_se"][k] = statistics.fmean(n["speedup_se"] for n in stated if n)
        result["spacings"][every] = entry
    return result


def _first(timing, k: int):
    from planner.evaluate import Timing

    return Timing(timing.seconds[:k], timing.reference_seconds[:k])


def _between_sessions(estimator, got, names, k: int) -> float:
    """The relative standard deviation across sessions of ``estimator``'s speedup, averaged over contenders."""
    spreads = []
    for name in names:
        values = [estimator(t.timings[name], t.reference_seconds, k) for t, _ in got]
        spreads.append(statistics.stdev(values) / statistics.fmean(values))
    return statistics.fmean(spreads)


def render(r: dict) -> None:
    print(f"digits-dit, {r['timed_seeds']} seeds per run, {len(r['contenders'])} contenders, {r['sessions']} timing "
          f"sessions of {r['rounds']} rounds per spacing, 1 torch thread.\n")
    print("Spread of a speedup from session to session (relative sd, mean over contenders), and the standard error "
          "timing_noise states from within each session (mean over sessions):\n")
    print("| full run after every | rounds | s per session | " + " | ".join(ESTIMATORS) + " | stated se |")
    print("|---|---|---|" + "---|" * len(ESTIMATORS) + "---|")
    for every, e in r["spacings"].items():
        for k, spread in e["estimators"].items():
            cells = " | ".join(f"{100 * v:.1f}%" for v in spread.values())
            print(f"| {every} contender{'s' if int(every) > 1 else ''} | {k} | {e['seconds_per_session']:.0f} | {cells} | "
                  f"{100 * e['stated_se'][k]:.1f}% |")
    print("\nSpeedups of each session (median of paired ratios, all rounds), full run after every contender:\n")
    for name, values in r["spacings"][SPACINGS[0]]["speedups"].items():
        print(f"- {name}: " + ", ".join(f"{v:.2f}x" for v in values))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--timed-seeds", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.sessions < 2 or args.rounds < 2:
        ap.error("--sessions and --rounds must be at least 2")
    result = measure(args.sessions, args.rounds, args.timed_seeds)
    return finish(NAME, result, lambda: render(result), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
