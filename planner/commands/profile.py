"""``planner profile``: measure a model (similarity across steps and CFG branches, module costs, a
latency model) and write a profile folder; ``planner profile show PATH`` and ``planner profile plot
PATH`` read one back."""

from __future__ import annotations

import argparse
from pathlib import Path

from planner.cli import add_json_flag, report
from planner.commands._args import add_condition_args, add_model_args, add_sampling_args
from planner.errors import PlannerError
from planner.limits import MAX_STEPS, count_arg, int_in, seed_arg

lags_arg = int_in(0, MAX_STEPS)

DEFAULT_DIR = "profiles"


def register(sub) -> None:
    """Add ``profile`` (with its optional ``show`` and ``plot`` actions) to the CLI."""
    p = sub.add_parser(
        "profile",
        help="profile a model: per-module similarity across steps and CFG branches, costs, latency model",
        description=(
            "Profile a model and write profiles/<model>_<scheduler><steps>_g<guidance>_<device>/ "
            "(or --out). `planner profile show PATH` summarises a profile, `planner profile plot PATH` draws it."
        ),
    )
    p.add_argument("--samples", type=count_arg, default=8, help="calibration inputs (default 8)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the first calibration input; the others count up")
    p.add_argument("--lags", type=lags_arg, default=3, help="compare each output with 1..LAGS steps back (default 3)")
    p.add_argument("--batch-size", type=count_arg, default=None, help="calibration inputs per run (default: all at once)")
    p.add_argument("--no-flops", action="store_true", help="skip the fvcore FLOP count")
    p.add_argument("--costs", choices=("measured", "flops"), default="measured",
                   help="module costs timed on this device (default), or FLOPs at a nominal rate (FLOP speedups)")
    p.add_argument("--out", default=None, help="profile folder to write (default: profiles/<generated name>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    scale = p.add_argument_group("scale (docs/scale.md)")
    scale.add_argument("--dry-run", action="store_true",
                       help="run a one-step probe, print the estimated model calls, memory and time, and exit without writing")
    scale.add_argument("--token-sample", type=int, default=None, metavar="N",
                       help="similarity statistics from N random token positions (the same every step), not all")
    scale.add_argument("--token-seed", type=int, default=0, help="seed of the token positions (default 0)")
    scale.add_argument("--shard", default=None, metavar="I/N",
                       help="profile shard I of N (a contiguous slice of the samples); join with `planner profile merge`")
    add_model_args(p)
    add_sampling_args(p)
    add_condition_args(p, prompts_help="calibration prompts: .txt (one a line) or .jsonl (default: the shipped "
                                       "calibration set)")
    add_json_flag(p)
    p.set_defaults(func=cmd_profile)

    actions = p.add_subparsers(dest="profile_action", metavar="{show,plot,merge}")
    s = actions.add_parser("show", help="summarise a profile: most/least stable modules, per-step curve, where the time goes")
    s.add_argument("path", help="profile folder (or its meta.json)")
    s.add_argument("--top", type=count_arg, default=5, help="modules listed per ranking (default 5)")
    add_json_flag(s)
    s.set_defaults(func=cmd_show)
    pl = actions.add_parser("plot", help="draw a profile's heatmaps, curves and cost chart as PNGs")
    pl.add_argument("path", help="profile folder (or its meta.json)")
    pl.add_argument("--out", default=None, help="folder for the PNGs (default: the profile folder)")
    add_json_flag(pl)
    pl.set_defaults(func=cmd_plot)
    mg = actions.add_parser("merge", help="join the shards of `planner profile --shard i/N` into one profile")
    mg.add_argument("paths", nargs="+", metavar="DIR", help="the shard folders (all N of them)")
    mg.add_argument("--out", default=None, help="profile folder to write (default: the shards' name without _shardIofN, beside them)")
    add_json_flag(mg)
    mg.set_defaults(func=cmd_merge)


def cmd_profile(args: argparse.Namespace) -> int:
    """Run the profiler the flags describe and write its folder."""
    from planner.commands._args import runner_from_args, sampler_from_args
    from planner.io import check_output_path
    from planner.profile import profile_model
    from planner.profile.artifact import default_profile_name
    from planner.profile.report import format_summary, summarize
    from planner.profile.shard import ShardSpec, shard_name

    if args.samples < 1:
        raise PlannerError(f"--samples must be at least 1, got {args.samples}")
    if args.lags < 1:
        raise PlannerError(f"--lags must be at least 1, got {args.lags}")
    if args.batch_size is not None and args.batch_size < 1:
        raise PlannerError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.out:
        check_output_path(args.out, "folder")
    if args.token_sample is not None and args.token_sample < 1:
        raise PlannerError(f"--token-sample must be a positive number of tokens, got {args.token_sample}")
    shard = ShardSpec.parse(args.shard) if args.shard is not None else None
    if shard is not None:
        shard.indices(args.samples)  # too many shards for the samples: refused before the model loads
    runner = runner_from_args(args)
    device = str(runner.device)
    sampler = sampler_from_args(runner, args)
    if args.dry_run:
        return _dry_run(args, runner, sampler, shard)
    name = default_profile_name(runner.spec, sampler, device)
    out = Path(args.out) if args.out else Path(DEFAULT_DIR) / (shard_name(name, shard) if shard else name)
    check_output_path(out, "folder")
    profile = profile_model(
        runner,
        sampler,
        samples=args.samples,
        seed=args.seed,
        lags=args.lags,
        batch_size=args.batch_size,
        costs=args.costs,
        flops=not args.no_flops,
        out=out,
        name=out.name,
        progress=not args.quiet,
        token_sample=args.token_sample,
        token_seed=args.token_seed,
        shard=shard,
    )
    summary = summarize(profile)
    payload = {"path": str(out), "name": profile.meta.name, "durations_s": profile.meta.durations_s, "summary": summary}
    report(args, payload, f"wrote {out}/ in {profile.meta.durations_s['total']:.1f} s\n\n{format_summary(summary)}")
    return 0


def _dry_run(args: argparse.Namespace, runner, sampler, shard) -> int:
    """Print what the profile run the flags describe would take (one-step probe); writes nothing."""
    from planner.profile.estimate import check_token_sample, estimate_profile

    samples = len(shard.indices(args.samples)) if shard is not None else args.samples
    est = estimate_profile(runner, sampler, samples=samples, batch_size=args.batch_size, lags=args.lags,
                           token_sample=args.token_sample, costs=args.costs, seed=args.seed)
    check_token_sample(args.token_sample, est.max_tokens)
    report(args, est.to_dict(), est.format())
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge shard profiles into one and write it."""
    import re

    from planner.io import check_output_path
    from planner.profile.shard import merge_profiles

    merged = merge_profiles(args.paths)  # checks everything before anything is written
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else first.parent / re.sub(r"_shard\d+of\d+$", "", first.name)
    if out.resolve() in {Path(p).resolve() for p in args.paths}:
        raise PlannerError(f"--out {out} is one of the shards; write the merged profile elsewhere")
    check_output_path(out, "folder")
    merged.meta = type(merged.meta)(**{**merged.meta.__dict__, "name": out.name})
    merged.save(out)
    payload = {"path": str(out), "name": out.name, "samples": merged.meta.samples,
               "shards": len(args.paths), "costs_from": merged.meta.extra["merged_from"]["costs"]}
    report(args, payload, f"merged {len(args.paths)} shards ({merged.meta.samples} samples) -> {out}/; "
                          f"costs from {merged.meta.extra['merged_from']['costs']}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Print a profile's summary."""
    from planner.profile import load_profile
    from planner.profile.report import format_summary, summarize

    if args.top < 1:
        raise PlannerError(f"--top must be at least 1, got {args.top}")
    summary = summarize(load_profile(args.path), top=args.top)
    report(args, summary, format_summary(summary))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Draw a profile's PNGs."""
    from planner.profile import load_profile
    from planner.profile.report import plot_profile

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlannerError("plotting needs matplotlib (pip install matplotlib)") from None
    if args.out:
        from planner.io import check_output_path

        check_output_path(args.out, "folder")
    profile = load_profile(args.path)
    paths = plot_profile(profile, args.out)
    report(args, {"files": [str(p) for p in paths]}, "\n".join(f"wrote {p}" for p in paths))
    return 0
