"""``planner eval --plan PLAN``: realized speedup and quality of a plan on held-out seeds."""

from __future__ import annotations

from pathlib import Path

from planner.cli import add_json_flag, report
from planner.commands._args import (
    add_condition_args,
    add_max_repeats_arg,
    add_model_args,
    add_size_args,
    check_max_repeats,
)
from planner.errors import PlannerError
from planner.limits import repeats_arg

DEFAULT_SAMPLES = 32


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a plan's realized speedup and quality against full compute on held-out inputs")
    p.add_argument("--plan", required=True, help="plan file (JSON)")
    p.add_argument("--against", default=None, metavar="PLAN",
                   help="another plan of the same model and sampler: timed in the same rounds, scored on the same "
                        "inputs, and the pooled PSNR difference given with a paired bootstrap interval")
    p.add_argument("--seeds", default=None,
                   help=f"held-out seeds: a range 100..131, a list 1,5..7 (default: {DEFAULT_SAMPLES} seeds from 1000000)")
    p.add_argument("--repeats", type=repeats_arg, default=5, help="timed runs per side, interleaved after a warm-up run")
    p.add_argument("--warmup", type=repeats_arg, default=1, help="untimed rounds before timing")
    add_max_repeats_arg(p)
    p.add_argument("--force", action="store_true", help="evaluate even on seeds or prompts the plan was calibrated on")
    p.add_argument("--out", default=None, help="write the JSON report here, and the markdown table beside it (.md)")
    p.add_argument("--png", default=None, help="save sample grids full / planned / difference to this PNG")
    add_model_args(p, default=None, model_help="model to run it on (default: the model the plan names); "
                                               "--revision, --dtype and the size default to the plan's")
    add_size_args(p.add_argument_group("size (default: the plan's)"))
    add_condition_args(p, prompts_help="held-out prompts to evaluate on, in turn: .txt or .jsonl (default: the "
                                       "shipped evaluation set); refused where they overlap the plan's calibration "
                                       "prompts unless --force")
    add_json_flag(p)
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from planner.commands._args import runner_from_args
    from planner.evaluate import eval_markdown, evaluate_plan_with_outputs
    from planner.io import check_output_path, json_safe, write_json_atomic, write_text_atomic
    from planner.pipelines.loading import names_a_function
    from planner.plan import load_plan
    from planner.runner import Sampler
    from planner.seeds import EVAL_SEED_BASE, check_held_out, evaluation_seeds, parse_seeds

    if args.repeats < 1:
        raise PlannerError(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0:
        raise PlannerError(f"--warmup must be at least 0, got {args.warmup}")
    check_max_repeats(args)
    plan = load_plan(args.plan)
    against = load_plan(args.against) if args.against else None
    if against is not None and Path(args.against).resolve() == Path(args.plan).resolve():
        raise PlannerError(f"--against names the plan itself ({args.against}): give the other plan to compare with")
    plans = [p for p in (plan, against) if p is not None]
    seeds = parse_seeds(args.seeds) if args.seeds is not None else evaluation_seeds(DEFAULT_SAMPLES, EVAL_SEED_BASE)
    for p in plans:  # refuse before loading anything
        check_held_out(seeds, p.provenance.calib_seeds, args.force)
    if args.out and Path(args.out).suffix == ".md":
        raise PlannerError("--out names the JSON report (the markdown table goes beside it as .md)")
    if args.out:
        check_output_path(args.out)
        check_output_path(Path(args.out).with_suffix(".md"))
    if args.png:
        check_output_path(args.png, "png")
    if args.prompts is not None and any(p.provenance.prompts for p in plans):  # checked before loading
        from planner.pipelines.prompts import as_prompt_set, check_held_out_prompts

        given = list(as_prompt_set(args.prompts))[:len(seeds)]
        for p in plans:
            check_held_out_prompts(given, (p.provenance.prompts or {}).get("keys", []), args.force)
    model = args.model or plan.model.spec
    if not model:
        raise PlannerError(f"plan {args.plan} names no model spec: give --model")
    if not args.model and names_a_function(model):  # a plan is data: what it names is run only when the user says so
        raise PlannerError(f"plan {args.plan} names the pipeline function {model}: a plan file does not run code, "
                           f"give --model {model} to call it")
    _plan_defaults(args, plan)
    runner = runner_from_args(args, model, prompts_as="evaluation")
    sampler = Sampler(plan.sampler.scheduler, plan.sampler.steps, plan.sampler.guidance,
                      height=args.height, width=args.width, num_frames=args.num_frames)
    for p in plans:
        p.check_model(runner)
        p.check_sampler(runner, sampler)  # steps, CFG layout, resolution and frames
    conditions = held_out_conditions(runner, plan, seeds, args.force)
    if against is not None:
        held_out_conditions(runner, against, seeds, args.force)  # refuses its calibration prompts too
    result, full, planned = evaluate_plan_with_outputs(runner, sampler, plan, seeds, repeats=args.repeats,
                                                       warmup=args.warmup, force=args.force, conditions=conditions,
                                                       max_repeats=args.max_repeats, against=against)
    if against is not None:
        result["against"] = {"plan": str(args.against), **result["against"]}
    payload = {"plan": str(args.plan), "model": model, "sampler": sampler.to_dict(), "device": str(runner.device), **result}
    if runner.family.text:
        payload["prompts"] = runner.prompts("evaluation").source
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


def _plan_defaults(args, plan) -> None:
    """Flags left unset take what the plan records: its model's revision, its dtype, its size."""
    pv, s = plan.provenance, plan.sampler
    if args.revision is None and args.model is None and pv.model_revision:
        args.revision = pv.model_revision
    if args.dtype is None and pv.dtype in ("float32", "bfloat16", "float16"):
        args.dtype = pv.dtype
    if s.resolution is not None and args.height is None and args.width is None:
        args.height, args.width = s.resolution
    if s.frames is not None and args.num_frames is None:
        args.num_frames = s.frames


def held_out_conditions(runner, plan, seeds: list[int], force: bool) -> list:
    """One condition per seed: text models take the evaluation prompts in turn (whatever the seeds), refused
    where one was a calibration prompt of the plan unless ``force``; other models their family's conditions."""
    from planner.pipelines.prompts import check_held_out_prompts

    if not runner.family.text:
        return runner.conditions(len(seeds), seed=seeds[0])
    prompts = runner.prompts("evaluation")
    conditions = [prompts[i % len(prompts)] for i in range(len(seeds))]
    recorded = plan.provenance.prompts or {}
    check_held_out_prompts(conditions, recorded.get("keys", []), force)
    return conditions
