"""``planner search --strategy NAME --budget 2x``: profile (or reuse a profile), search, write a plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

from planner.cli import add_json_flag, report
from planner.commands.sample import add_sampler_args, runner_and_sampler
from planner.errors import PlannerError
from search import RUN_OPTIONS

PROFILES_DIR = Path("profiles")
PLANS_DIR = Path("plans")


def register(sub) -> None:
    p = sub.add_parser("search", help="search a cache plan that meets a speed budget (or an error target)")
    p.add_argument("--strategy", default="greedy", help="a registered strategy: greedy, uniform, smoothcache, ...")
    p.add_argument("--budget", default=None, help="predicted speedup (2x) or run-time fraction (60%%); default 2x")
    p.add_argument("--max-error", type=float, default=None, help="instead of a budget: relative L1 of the final output")
    p.add_argument("--profile", default=None, help="profile folder (default: profiles/<name>, made if missing)")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration inputs (seeds 0..N-1)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="strategy parameter (VALUE read as JSON when it parses), repeatable")
    p.add_argument("--out", default=None, help="plan file (default: plans/<model>-<sampler>-<strategy>-<budget>.json)")
    p.add_argument("--verify", action="store_true", help="then measure realized speedup and PSNR/SSIM on held-out seeds")
    p.add_argument("--verify-samples", type=int, default=8)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    run = p.add_argument_group("search runs (strategies that use them: optuna's study, learned routers' training)")
    run.add_argument("--seed", type=int, default=None, help="random seed of the search (default: the strategy's, 0)")
    run.add_argument("--n-trials", type=int, default=None, help="trials this process runs (optuna)")
    run.add_argument("--storage", default=None, help="an Optuna storage URL (sqlite:///f.db, postgresql://..., journal:FILE)")
    run.add_argument("--study", default=None, help="study name in --storage (workers that name one study share it)")
    run.add_argument("--resume", action="store_true", help="continue from the checkpoint next to the plan (learned routers)")
    add_sampler_args(p, steps=None, guidance=None)
    add_json_flag(p)
    p.set_defaults(func=cmd_search)


def parse_params(items: list[str]) -> dict:
    """``["delta=0.1", "level=block"]`` -> ``{"delta": 0.1, "level": "block"}``."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PlannerError(f"--param takes KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def strategy_params(args) -> dict:
    """``--param`` items plus the run options given on the command line (``--seed 3`` -> ``seed=3``)."""
    params = parse_params(args.param)
    for key in RUN_OPTIONS:
        value = getattr(args, key, None)
        if value not in (None, False):
            params[key] = value
    return params


def artifacts_dir(plan_path: Path) -> Path:
    """The folder for a search's by-products: ``plans/NAME/`` beside ``plans/NAME.json``."""
    return plan_path.with_suffix("")


def default_plan_path(spec: str, sampler, strategy: str, budget) -> Path:
    """``plans/digits-dit-ddim50-g3-greedy-2x.json`` and the like."""
    from planner.profile.artifact import slug

    model = slug(Path(spec).name if Path(spec).is_dir() else spec)
    return PLANS_DIR / f"{model}-{slug(sampler.scheduler)}{sampler.steps}-g{sampler.guidance:g}-{strategy}-{budget.label()}.json"


def load_or_make_profile(runner, sampler, path: str | None, samples: int, device: str, progress: bool):
    """The profile at ``path``, or the default one for this model/sampler/device (made when missing)."""
    from planner.profile import default_profile_name, load_profile, profile_model

    if path is not None:
        return load_profile(path)
    default = PROFILES_DIR / default_profile_name(runner.spec, sampler, device)
    if (default / "meta.json").is_file():
        profile = load_profile(default)
        if profile.meta.fingerprint == runner.fingerprint() and profile.meta.samples >= samples:
            return profile
    return profile_model(runner, sampler, samples=samples, device=device, out=default, progress=progress)


def cmd_search(args) -> int:
    from planner.plan import save_plan
    from search import get_strategy
    from search.budget import Budget
    from search.context import SearchContext

    budget = Budget.parse(args.budget if args.budget or args.max_error is not None else "2x", args.max_error)
    strategy = get_strategy(args.strategy)(**strategy_params(args))
    if args.calib_samples < 1:
        raise PlannerError(f"--calib-samples must be at least 1, got {args.calib_samples}")
    progress = not (args.quiet or args.json)
    runner, sampler = runner_and_sampler(args)
    start = time.perf_counter()
    profile = load_or_make_profile(runner, sampler, args.profile, args.calib_samples, str(runner.device), progress)
    profile_s = time.perf_counter() - start

    out = Path(args.out) if args.out else default_plan_path(runner.spec, sampler, args.strategy, budget)
    start = time.perf_counter()
    context = SearchContext.build(runner, sampler, profile, samples=args.calib_samples, progress=progress,
                                  artifacts=artifacts_dir(out))
    if budget.speedup is not None and budget.speedup > context.max_speedup():
        raise PlannerError(
            f"budget {budget.label()} cannot be met: even reusing every block at every step but the first "
            f"gives {context.max_speedup():.2f}x"
        )
    plan = strategy.search(context, budget)
    search_s = time.perf_counter() - start
    pred = plan.prediction
    if not budget.met(pred.speedup, pred.calib_error):
        raise PlannerError(f"strategy {args.strategy} returned a plan that misses the budget ({pred.speedup:.2f}x, error {pred.calib_error:.4f})")
    save_plan(plan, out)

    payload = {
        "plan": str(out),
        "strategy": args.strategy,
        "budget": budget.to_dict(),
        "predicted_speedup": pred.speedup,
        "calib_error": pred.calib_error,
        "profile": profile.meta.name,
        "profile_s": round(profile_s, 2),
        "search_s": round(search_s, 2),
        "evaluations": context.evaluations,
        "params": plan.provenance.params,
    }
    text = (
        f"{args.strategy} plan for {budget.label()}: predicted speedup {pred.speedup:.2f}x, "
        f"calibration error (rel. L1 of final latents) {pred.calib_error:.4f}; searched in {search_s:.1f} s -> {out}"
    )
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
