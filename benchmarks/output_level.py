"""The same periodic schedules with every block forecast, or with the transformer's whole output served.

On each model, one periodic schedule at a time (one step in two computed after one warm-up step, one in
three after two) is applied at two levels: every block forecast at the forecast steps (the layers
around the blocks still run), or the whole output served (``Plan.output``: nothing of the transformer
runs). FLOP speedup as the bench counts it (``planner.bench.flops``, on two seeds: the ratio does not
depend on the batch), and pooled PSNR (the headline), mean and worst per-image PSNR on held-out seeds
against the full run.

Results go to ``benchmarks/results/output_level.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/output_level.py --seeds 128
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import held_out_models, parser  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402

SCHEDULES = {"one in two": (1, 2), "one in three": (2, 3)}  # warm-up steps, stride
CODES = ("F", "L")
LEVELS = ("block", "output")


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)

    from planner.bench.flops import count_flops
    from planner.executor import apply_plan
    from planner.metrics import psnr_summary
    from planner.plan import plan_for_runner
    from planner.search._periodic import PeriodicShape

    models = []
    for m in held_out_models(args.models, args.seeds):
        def flops(plan=None):  # the bench's count, on the first two seeds
            context = None if plan is None else (lambda: apply_plan(m.runner.pipe, plan))
            return count_flops(lambda: m.runner.run(m.conditions[:2], m.seeds[:2], m.sampler), context)[0]

        full = flops()
        rows = []
        for label, (warmup, stride) in SCHEDULES.items():
            for code in CODES:
                codes = PeriodicShape("block", code, warmup, 0, 0, stride=(stride, stride)).codes(m.sampler.steps)
                for level in LEVELS:
                    plan = (plan_for_runner(m.runner, m.sampler, {}, output=codes) if level == "output"
                            else plan_for_runner(m.runner, m.sampler, {b: codes for b in m.blocks}))
                    rows.append({"schedule": label, "code": code, "level": level, "codes": codes,
                                 "flop_speedup": full / flops(plan), **psnr_summary(m.run(plan), m.reference)})
        models.append({"model": m.name, "sampler": m.label, "rows": rows})

    def render():
        print(f"Periodic schedules with every block forecast or the whole output served; FLOP speedup as the bench "
              f"counts it; PSNR in dB against the full run on {args.seeds} held-out seeds: pooled (MSE over all "
              "images) / mean of per-image / worst image.\n")
        print("| model | schedule | forecast | blocks: FLOP speedup | blocks: PSNR | output: FLOP speedup | output: PSNR |")
        print("|---|---|---|---|---|---|---|")
        for m in models:
            for label in SCHEDULES:
                for code in CODES:
                    cells = {r["level"]: r for r in m["rows"] if r["schedule"] == label and r["code"] == code}
                    print(f"| {m['model']} | {label} | {code} | "
                          + " | ".join(f"{cells[lv]['flop_speedup']:.3f}x | {psnr_text(cells[lv])}" for lv in LEVELS)
                          + " |")
        print("\nSamplers: " + "; ".join(f"{m['model']} {m['sampler']}" for m in models) + ".")

    return finish("output_level", {"seeds": args.seeds, "models": models}, render, args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
