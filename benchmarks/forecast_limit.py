"""First-order, second-order and limited second-order forecasts (F, Q, L) on the same schedules.

On each model, every block follows one periodic schedule after three computed warm-up steps: one step
in two computed, and one in three. The forecast steps use ``F``, ``Q`` or ``L`` (the second-order
forecast with its second-order term cut, per sample, to the first-order term's size;
``planner.executor.hooks.limited_forecast2``). Pooled PSNR (the headline), mean and worst per-image
PSNR on held-out seeds against the full run, so that rare diverging samples show.

Results go to ``benchmarks/results/forecast_limit.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/forecast_limit.py --seeds 128
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._held_out import held_out_models, parser  # noqa: E402
from benchmarks._results import finish, psnr_text  # noqa: E402

STRIDES = {"one in two": 2, "one in three": 3}
CODES = ("F", "Q", "L")


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)

    from planner.metrics import psnr_summary
    from planner.plan import plan_for_runner
    from planner.search._periodic import PeriodicShape

    models = []
    for m in held_out_models(args.models, args.seeds):
        rows = []
        for label, stride in STRIDES.items():
            for code in CODES:
                codes = PeriodicShape("block", code, 3, 0, 0, stride=(stride, stride)).codes(m.sampler.steps)
                out = m.run(plan_for_runner(m.runner, m.sampler, {b: codes for b in m.blocks}))
                rows.append({"schedule": label, "code": code, "codes": codes, **psnr_summary(out, m.reference)})
        models.append({"model": m.name, "sampler": m.label, "rows": rows})

    def render():
        print(f"Every block on one periodic schedule after 3 computed warm-up steps; PSNR in dB against the full "
              f"run on {args.seeds} held-out seeds: pooled (MSE over all images) / mean of per-image / worst image.\n")
        print("| model | schedule | F | Q | L |")
        print("|---|---|---|---|---|")
        for m in models:
            for label in STRIDES:
                cells = {r["code"]: r for r in m["rows"] if r["schedule"] == label}
                print(f"| {m['model']} | {label} | "
                      + " | ".join(psnr_text(cells[c]) for c in CODES) + " |")
        print("\nSamplers: " + "; ".join(f"{m['model']} {m['sampler']}" for m in models) + ".")

    return finish("forecast_limit", {"seeds": args.seeds, "models": models}, render, args.json, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
