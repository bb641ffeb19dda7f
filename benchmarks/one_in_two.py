"""Every one-in-two schedule of ours next to diffusers' TaylorSeer at its own one in two.

After one computed warm-up step, one step in two is computed and the others are served: the transformer's
whole output or every block's, by a first-order, limited second-order or second-order forecast (``F``,
``L``, ``Q``). TaylorSeer at ``cache_interval=2`` with a 1-step warm-up (order 1, forecasting block outputs,
as the bench runs it) computes the same steps and forecasts the blocks to first order, so it should match
our block-level ``F`` schedule. These schedules are what every method's 2x-of-FLOPs point on these models
is made of, so the table bounds what a choice among them can gain over the peer at 2x.

Each schedule's FLOP speedup is counted too: a block-level schedule still runs the transformer's embedding
and final layer at its forecast steps, so it falls just short of 2x. More rows give what closing that gap
costs: the block-level ``L`` schedule with one computed step fewer (a three-step forecast run in the
middle, or two two-step runs: the later computed steps shifted by one, the last two steps forecast), or
with the first few blocks forecast at one computed step (the one nearest 30 %, 50 % or 70 % of the steps;
as few blocks as reach 2x). The sub-layer rows forecast every attention and MLP output instead of the
blocks (the norms, modulation and gates run at every step, so they cost more than a block's schedule).

Pooled, mean and worst per-image PSNR on held-out seeds against the full run. Results go to
``benchmarks/results/one_in_two.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/one_in_two.py --seeds 128
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import held_out_models, parser  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402

LEVELS = ("output", "block", "sublayer")
TRIM_AT = (0.3, 0.5, 0.7)
CODES = ("F", "L", "Q")
PEER = "diffusers-taylorseer"


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)

    import contextlib

    from planner.bench.flops import count_flops
    from planner.bench.peers import peer_runs
    from planner.executor import apply_plan
    from planner.metrics import psnr_summary
    from planner.plan import plan_for_runner
    from planner.modules import modules_at_level
    from planner.search._periodic import OUTPUT, PeriodicShape

    models = []
    for m in held_out_models(args.models, args.seeds):
        one = (m.conditions[:1], m.seeds[:1], m.sampler)  # FLOPs are the same for every input
        full, _ = count_flops(lambda: m.runner.run(*one))

        def flop_speedup(run, context):
            """Full compute's FLOPs over those of ``run(conditions, seeds, sampler)`` inside ``context()``."""
            return full / count_flops(lambda: run(*one), context)[0]

        def row(method, run, context=contextlib.nullcontext, codes=None):
            """``run(conditions, seeds, sampler)`` inside ``context()``: its FLOP speedup and PSNR."""
            with context():
                out = run(m.conditions, m.seeds, m.sampler)
            return {"method": method, "codes": codes, "flop_speedup": flop_speedup(run, context),
                    **psnr_summary(out, m.reference)}

        def planned(level, codes):
            if level == OUTPUT:
                return plan_for_runner(m.runner, m.sampler, {}, output=codes)
            if not isinstance(codes, dict):  # one code string for every module of the level
                codes = {n: codes for n in modules_at_level(m.runner.modules(), level)}
            return plan_for_runner(m.runner, m.sampler, codes)

        def applied(level, codes):
            plan = planned(level, codes)
            return lambda: apply_plan(m.runner.pipe, plan)

        def scheduled(method, level, codes):
            return row(method, m.runner.run, applied(level, codes), codes)

        def reaches_2x(decisions):
            return flop_speedup(m.runner.run, applied("block", decisions)) >= 2.0

        one_in_two = {(level, code): PeriodicShape(level, code, 1, 0, 0, stride=(2, 2)).codes(m.sampler.steps)
                      for level in LEVELS for code in CODES}
        rows = [scheduled(f"{level} {code}", level, codes) for (level, code), codes in one_in_two.items()]
        rows += [scheduled(f"block L, {label}", "block", codes) for label, codes in one_fewer(m.sampler.steps).items()]
        for at in TRIM_AT:
            decisions = trimmed(one_in_two[("block", "L")], m.blocks, at, reaches_2x)
            rows.append(scheduled(f"block L, first blocks forecast at {at:.0%} of the steps", "block", decisions))
        (peer,), _ = peer_runs(m.runner, m.sampler, [PEER], {PEER: [2]}, {PEER: [1]})
        rows.append(row(f"{PEER} {peer.setting}", peer.run))
        models.append({"model": m.name, "sampler": m.label, "rows": rows})

    def render():
        print(f"One computed warm-up step, then one step in two computed; PSNR in dB against the full run on "
              f"{args.seeds} held-out seeds: pooled (MSE over all images) / mean of per-image / worst image.\n")
        names = [r["method"] for r in models[0]["rows"]]
        print("| schedule | " + " | ".join(m["model"] for m in models) + " |")
        print("|---|" + "---|" * len(models))
        for i, name in enumerate(names):
            print(f"| {name} | " + " | ".join(f"{psnr_text(m['rows'][i])} ({m['rows'][i]['flop_speedup']:.3f}x)"
                                              for m in models) + " |")
        print("\nSamplers: " + "; ".join(f"{m['model']} {m['sampler']}" for m in models) + ".")

    return finish("one_in_two", {"seeds": args.seeds, "models": models}, render, args.json, args.out)


def one_fewer(steps: int) -> dict[str, str]:
    """Block-level ``L`` on one in two after a 1-step warm-up, with one computed step fewer: a three-step
    forecast run in the middle, or the computed steps from three quarters on shifted one later."""
    base = ["C" if i % 2 == 0 else "L" for i in range(steps)]
    middle = list(base)
    middle[steps // 2 - steps // 2 % 2] = "L"  # the even step nearest the middle
    late = 3 * steps // 4 - 3 * steps // 4 % 2
    shifted = ["C" if (i <= late and i % 2 == 0) or (late + 1 < i < steps - 1 and (i - late) % 2 == 1) else "L"
               for i in range(steps)]
    return {"LLL in the middle": "".join(middle), "two LL runs": "".join(shifted)}


def trimmed(codes: str, blocks: list[str], at: float, fast_enough) -> dict[str, str]:
    """``codes`` on every block, with the first blocks forecast (``codes``' forecast code) at the computed step
    nearest ``at`` of the steps: as few blocks as make ``fast_enough(decisions)`` true (all of them if none do)."""
    forecast = next(c for c in codes if c != "C")
    step = min((i for i, c in enumerate(codes) if c == "C" and i > 0), key=lambda i: abs(i - at * len(codes)))
    cut = codes[:step] + forecast + codes[step + 1:]
    for k in range(1, len(blocks) + 1):
        decisions = {b: cut if i < k else codes for i, b in enumerate(blocks)}
        if fast_enough(decisions):
            break
    return decisions


if __name__ == "__main__":
    raise SystemExit(main())
