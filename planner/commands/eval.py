"""``planner eval --plan PLAN``: realized speedup and quality of a plan on held-out seeds."""

from __future__ import annotations

from pathlib import Path

from planner.cli import add_json_flag, report
from planner.errors import PlannerError
from planner.limits import repeats_arg

DEFAULT_SAMPLES = 32


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a plan's realized speedup and quality against full compute on held-out seeds")
    p.add_argument("--plan", required=True, help="plan file (JSON)")
    p.add_argument("--model", default=None, help="model to run it on (default: the model the plan names)")
    p.add_argument("--seeds", default=None,
                   help=f"held-out seeds: a range 100..131, a list 1,5..7 (default: {DEFAULT_SAMPLES} seeds from 1000000)")
    p.add_argument("--repeats", type=repeats_arg, default=5, help="timed runs per side, interleaved after a warm-up run")
    p.add_argument("--warmup", type=repeats_arg, default=1, help="untimed rounds before timing")
    p.add_argument("--force", action="store_true", help="evaluate even on seeds the plan was calibrated on")
    p.add_argument("--out", default=None, help="write the JSON report here, and the markdown table beside it (.md)")
    p.add_argument("--png", default=None, help="save sample grids full / planned / difference to this PNG")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_json_flag(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from planner.evaluate import eval_markdown, evaluate_plan_with_outputs
    from planner.io import json_safe
    from planner.seeds import EVAL_SEED_BASE, check_held_out, evaluation_seeds, parse_seeds
    from planner.io import check_output_path, write_json_atomic, write_text_atomic
    from planner.plan import load_plan
    from planner.runner import Sampler, load_runner, resolve_device

    if args.repeats < 1:
        raise PlannerError(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        raise PlannerError(f"--warmup must be at least 0, got {args.warmup}")
    plan = load_plan(args.plan)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else evaluation_seeds(DEFAULT_SAMPLES, EVAL_SEED_BASE)
    check_held_out(seeds, plan.provenance.calib_seeds, args.force)  # refuse before loading anything
    if args.out and Path(args.out).suffix == ".md":
        raise PlannerError("--out names the JSON report (the markdown table goes beside it as .md)")
    if args.out:
        check_output_path(args.out)
        check_output_path(Path(args.out).with_suffix(".md"))
    if args.png:
        check_output_path(args.png)
    model = args.model or plan.model.spec
    if not model:
        raise PlannerError(f"plan {args.plan} names no model spec: give --model")
    runner = load_runner(model, device=resolve_device(args.device))
    plan.check_model(runner)
    sampler = Sampler(plan.sampler.scheduler, plan.sampler.steps, plan.sampler.guidance)
    result, full, planned = evaluate_plan_with_outputs(runner, sampler, plan, seeds, repeats=args.repeats,
                                                       warmup=args.warmup, force=args.force)
    payload = {"plan": str(args.plan), "model": model, "sampler": sampler.to_dict(), "device": str(runner.device), **result}
    markdown = eval_markdown(result)
    if args.png:
        from planner.bench.report import save_comparison_grid

        title = f"{plan.provenance.strategy} plan vs full compute, seeds {result['seeds']}"
        save_comparison_grid(full, planned, args.png, title=title)
        payload["png"] = args.png
    if args.out:
        out = Path(args.out)
        write_json_atomic(out, json_safe(payload))
        write_text_atomic(out.with_suffix(".md"), markdown + "\n")
        payload["out"] = str(out)
    report(args, json_safe(payload), markdown)
    return 0

