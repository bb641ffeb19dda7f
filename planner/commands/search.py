"""``planner search --strategy NAME --budget 2x``: profile (or reuse a profile), search, write a plan;
``planner strategies [NAME]``: the strategies and their declared settings."""

from __future__ import annotations

import json
from pathlib import Path

from planner.cli import add_json_flag, report
from planner.commands.sample import add_sampler_args, runner_and_sampler
from planner.errors import PlannerError
from planner.limits import count_arg, finite_float, seed_arg

PLANS_DIR = Path("plans")


def register(sub) -> None:
    p = sub.add_parser("search", help="search a cache plan that meets a speed budget (or an error target)")
    p.add_argument("--strategy", default="greedy", help="a registered strategy (`planner strategies` lists them)")
    p.add_argument("--budget", default=None, help="predicted speedup (2x) or run-time fraction (60%%); default 2x")
    p.add_argument("--max-error", type=finite_float, default=None, help="instead of a budget: relative L1 of the final output")
    p.add_argument("--costs", choices=("measured", "flops"), default="measured",
                   help="what the budget is in: the profile's measured times on its device (default), or its FLOP "
                        "counts (the speedup a large model on an accelerator approaches)")
    p.add_argument("--profile", default=None, help="profile folder (default: profiles/<name>, made if missing)")
    p.add_argument("--calib-samples", type=count_arg, default=8, help="calibration inputs (seeds 0..N-1)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy setting (VALUE read as JSON when it parses), repeatable")
    p.add_argument("--list-params", action="store_true", help="print the strategy's settings and exit")
    p.add_argument("--out", default=None, help="plan file (default: plans/<model>-<sampler>-<strategy>-<budget>.json)")
    p.add_argument("--verify", action="store_true", help="then measure realized speedup and PSNR/SSIM on held-out seeds")
    p.add_argument("--verify-samples", type=count_arg, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dry-run", action="store_true",
                   help="say which profile the search would use and, when it would make one, estimate it (one-step probe); write nothing")
    run = p.add_argument_group("search runs (strategies that declare them: optuna's study, learned routers' training)")
    run.add_argument("--seed", type=seed_arg, default=None, help="random seed of the search (default: the strategy's, 0)")
    run.add_argument("--n-trials", type=count_arg, default=None, help="trials this process runs (optuna)")
    run.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///f.db, postgresql://..., journal:FILE)")
    run.add_argument("--study", default=None, help="study name in --storage (workers that name one study share it)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint next to the plan (learned routers)")
    add_sampler_args(p, steps=None, guidance=None, eval_prompts=True)
    add_json_flag(p)
    p.set_defaults(func=cmd_search)

    s = sub.add_parser("strategies", help="list the search strategies, or one strategy's settings")
    s.add_argument("name", nargs="?", default=None, help="a strategy: print its settings")
    s.add_argument("--markdown", action="store_true", help="the settings as the markdown table the docs show")
    add_json_flag(s)
    s.set_defaults(func=cmd_strategies)


def parse_params(items: list[str]) -> dict:
    """``["delta=0.1", "level=block"]`` -> ``{"delta": 0.1, "level": "block"}``."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlannerError(f"--param takes KEY=VALUE, got {item!r}")
        params[key] = param_value(value, key)
    return params


def param_value(text: str, key: str):
    """A ``--param`` value: JSON when it parses (nested at most as deep as any artifact), else the string."""
    from planner.artifact import MAX_JSON_DEPTH, max_nesting

    if max_nesting(text) > MAX_JSON_DEPTH:
        raise PlannerError(f"--param {key}: value nested more than {MAX_JSON_DEPTH} levels deep")
    try:
        return json.loads(text)
    except ValueError:  # not JSON (JSONDecodeError), or an integer of thousands of digits: keep the text
        return text


def strategy_params(args) -> dict:
    """``--param`` items plus the run options given on the command line (``--seed 3`` -> ``seed=3``)."""
    from planner.search.settings import RUN_OPTIONS

    params = parse_params(args.param)
    for key in RUN_OPTIONS:
        value = getattr(args, key, None)
        if value is not None and value is not False:  # --n-trials 0 and --seed 0 are given values
            params[key] = value
    return params


def default_plan_path(spec: str, sampler, strategy: str, budget, costs: str = "measured") -> Path:
    """``plans/digits-dit-ddim50-g3-greedy-2x.json`` (``...-2x-flops.json`` for a budget in FLOPs) and the like."""
    from planner.profile.artifact import slug

    model = slug(Path(spec).name if Path(spec).is_dir() else spec)
    suffix = "-flops" if costs == "flops" else ""
    return PLANS_DIR / (f"{model}-{slug(sampler.scheduler)}{sampler.steps}-g{sampler.guidance:g}-{strategy}-"
                        f"{budget.label()}{suffix}.json")


def check_plan_output(out: Path) -> None:
    """PlannerError unless the plan file and its by-product folder beside it can be written."""
    from planner.io import check_output_path
    from planner.plan import artifacts_dir

    if out.suffix != ".json":
        raise PlannerError(f"--out names a plan file, which ends in .json: {out}")
    check_output_path(out)
    check_output_path(artifacts_dir(out), "folder")


def cmd_search(args) -> int:
    from planner.search import make_strategy
    from planner.search.api import as_budget, run_search

    if args.list_params:
        args.name, args.markdown = args.strategy, False
        return cmd_strategies(args)
    budget = as_budget(args.budget, args.max_error)
    strategy = make_strategy(args.strategy, strategy_params(args))  # bad settings fail before any model loads
    if args.calib_samples < 1:
        raise PlannerError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    progress = not (args.quiet or args.json)
    if args.out:
        check_plan_output(Path(args.out))
    runner, sampler = runner_and_sampler(args)
    if args.dry_run:
        return _dry_run(args, runner, sampler)
    out = Path(args.out) if args.out else default_plan_path(runner.spec, sampler, args.strategy, budget, args.costs)
    check_plan_output(out)
    outcome = run_search(runner, budget, strategy=strategy, sampler=sampler, profile=args.profile,
                         calib_samples=args.calib_samples, out=out, progress=progress, costs=args.costs)
    plan, pred = outcome.plan, outcome.plan.prediction
    payload = {
        "plan": str(out),
        "strategy": args.strategy,
        "budget": budget.to_dict(),
        "predicted_speedup": pred.speedup,
        "costs": pred.costs,
        "calib_error": pred.calib_error,
        "profile": outcome.context.profile.meta.name,
        "profile_s": round(outcome.profile_s, 2),
        "search_s": round(outcome.search_s, 2),
        "evaluations": outcome.context.evaluations,
        "search_cost": outcome.cost,
        "params": plan.provenance.params,
    }
    text = (
        f"{args.strategy} plan for {budget.label()}{' in FLOPs' if pred.costs == 'flops' else ''}: predicted speedup "
        f"{pred.speedup:.2f}x, "
        f"calibration error (rel. L1 of final latents) {pred.calib_error:.4f}; searched in {outcome.search_s:.1f} s -> {out}"
    )
    if outcome.cost:
        c = outcome.cost
        text += (f"\nsearch cost: {c['transformer_calls']} transformer calls, {c['runs']:.1f} full sampling runs of the "
                 f"calibration batch by blocks run ({c['runs_by_calls']:.1f} by calls), {c['wall_s']:.1f} s")
    if args.verify:
        from planner.evaluate import verify_plan

        v = verify_plan(runner, sampler, plan, samples=args.verify_samples)
        payload["verify"] = v
        text += (
            f"\nheld-out seeds {v['seeds']}: realized speedup {v['speedup']:.2f}x "
            f"(range {v['speedup_range'][0]:.2f}-{v['speedup_range'][1]:.2f}), PSNR {v['psnr']:.2f} dB, SSIM {v['ssim']:.4f}"
        )
    report(args, payload, text)
    return 0


def _dry_run(args, runner, sampler) -> int:
    """What ``planner search`` would profile (estimated by a one-step probe), without writing anything."""
    from planner.profile.estimate import estimate_profile
    from planner.profile.store import existing_profile

    found, default = existing_profile(runner, sampler, args.profile, samples=args.calib_samples)
    reference = {"runs": 1, "model_calls": sampler.steps * runner.cfg_layout(sampler).calls_per_step,
                 "note": "full-compute outputs of the calibration inputs; the strategy's own evaluations come on top"}
    if found is not None:
        payload = {"profile": str(found.path), "profiles": False, "reference": reference}
        report(args, payload, f"dry run: the search would use the profile {found.path} (nothing to profile); "
                              f"then one full-compute run of {args.calib_samples} calibration inputs and the strategy's evaluations")
        return 0
    est = estimate_profile(runner, sampler, samples=args.calib_samples)
    payload = {"profile": str(default), "profiles": True, "estimate": est.to_dict(), "reference": reference}
    report(args, payload, f"the search would first profile into {default}/:\n" + est.format())
    return 0


def cmd_strategies(args) -> int:
    from planner.search import get_strategy, strategy_names
    from planner.search.settings import describe, settings_table

    if args.name is None:
        rows = [{"name": n, "summary": get_strategy(n).summary} for n in strategy_names()]
        text = "\n".join(f"{r['name']:<12} {r['summary']}" for r in rows)
        text += "\n(`planner strategies NAME` lists a strategy's settings)"
        report(args, {"strategies": rows}, text)
        return 0
    cls = get_strategy(args.name)
    if args.markdown:
        print(settings_table(cls.Settings))
        return 0
    rows = describe(cls.Settings)
    lines = [f"{cls.name}: {cls.summary}", "settings (--param KEY=VALUE, or the flag shown):"]
    for r in rows:
        name = r["name"] + (f" ({r['flag']})" if "flag" in r else "")
        kind = r["type"] + (f", {r['range']}" if r["range"] else "")
        lines.append(f"  {name}: {kind}, default {r['default']}\n      {r['doc']}")
    report(args, {"strategy": cls.name, "summary": cls.summary, "settings": rows}, "\n".join(lines))
    return 0
