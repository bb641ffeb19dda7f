"""``planner bench``: every strategy, the baselines and the peer tools on one model (or each of several:
``--models a,b,c``), sampler and set of held-out seeds; writes a results table (CSV, markdown, JSON),
a Pareto plot and the environment per model, and with ``--models`` a summary of the worst-case
margins of our best strategy across the models."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from planner.cli import add_json_flag, report
from planner.commands._args import add_max_repeats_arg, check_max_repeats
from planner.commands.sample import add_sampler_args
from planner.errors import PlannerError
from planner.limits import count_arg, int_in, repeats_arg

threads_arg = int_in(0, 4096)

BENCH_DIR = Path("bench")
DEFAULT_SAMPLES = 32


def register(sub) -> None:
    p = sub.add_parser("bench", help="all strategies, baselines and peer tools side by side at matched realized speedup")
    p.add_argument("--models", default=None, help="comma list of models to bench one after the other (instead of "
                   "--model): one folder per model under --out, and summary.json/summary.md of the margins across them")
    p.add_argument("--budgets", default="1.5x,2x,3x", help="speed budgets of the searches and the fewer-steps baseline")
    p.add_argument("--costs", default="measured",
                   help="what our strategies' budgets are in: measured (the profile's times, default), flops, or "
                        "measured,flops (one plan each, for the realized and the FLOP axis)")
    p.add_argument("--strategies", default="all", help="comma list of registered strategies, 'all' or 'none'")
    p.add_argument("--param", action="append", default=[], metavar="STRATEGY:KEY=VALUE",
                   help="a strategy's search parameter (VALUE read as JSON when it parses), repeatable")
    p.add_argument("--peers", default="all", help="comma list of peer tools, 'all' or 'none' (diffusers-fbcache, "
                   "diffusers-taylorseer, diffusers-magcache, diffusers-pab, diffusers-fastercache, cache-dit-dbcache"
                   "[-F2B1|-F4B0][-taylorseer])")
    p.add_argument("--sweep", action="append", default=[], metavar="PEER=V1,V2,...",
                   help="knob values traced for a peer (a threshold, or a cache interval / skip range), repeatable")
    p.add_argument("--peer-warmups", action="append", default=[], metavar="PEER=S1,S2,...",
                   help="warm-ups traced for a peer, in steps it computes first, each with every --sweep value "
                        "(diffusers-taylorseer, diffusers-magcache, cache-dit-dbcache*; default: TaylorSeer 1, 3 "
                        "and 5, the others their own), repeatable")
    p.add_argument("--seeds", default=None, help=f"held-out seeds, e.g. 1000000..1000031 (default: {DEFAULT_SAMPLES} from 1000000)")
    p.add_argument("--timed-seeds", type=count_arg, default=None,
                   help="time every method on the first N of the seeds only, score its quality on all of them "
                        "(default: all timed; e.g. 256 seeds scored, 32 timed)")
    p.add_argument("--calib-samples", type=count_arg, default=8, help="calibration inputs of the searches (seeds 0..N-1)")
    p.add_argument("--profile", default=None, help="profile folder (default: profiles/<name>, made if missing)")
    p.add_argument("--repeats", type=repeats_arg, default=5, help="timed runs of every method, interleaved with full compute")
    p.add_argument("--warmup", type=repeats_arg, default=1, help="untimed rounds of every method first")
    add_max_repeats_arg(p)
    p.add_argument("--reference-every", type=count_arg, default=1,
                   help="a full-compute run after every N method runs (1: each run is paired with the full runs "
                        "right beside it, which settles a speedup in fewer runs; benchmarks/timing_noise.py)")
    p.add_argument("--no-fewer-steps", action="store_true", help="leave out the fewer-sampling-steps baseline")
    p.add_argument("--no-top-up", action="store_true", help="do not search again where our plan for the largest "
                   "budget on measured costs ran slower than that budget")
    p.add_argument("--threads", type=threads_arg, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--out", default=None, help="output folder (default: bench/<model>; with --models: bench/, one "
                   "subfolder per model)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_sampler_args(p, steps=None, guidance=None, eval_prompts=True)
    add_json_flag(p)
    p.set_defaults(func=cmd_bench)


def parse_strategy_params(items: list[str]) -> dict[str, dict]:
    """``["l2c:iterations=200", "uniform:level=block"]`` -> ``{"l2c": {"iterations": 200}, "uniform": {"level": "block"}}``."""
    params: dict[str, dict] = {}
    for item in items:
        strategy, sep, rest = item.partition(":")
        key, eq, value = rest.partition("=")
        if not sep or not strategy or not eq or not key:
            raise PlannerError(f"--param takes STRATEGY:KEY=VALUE, got {item!r}")
        from planner.commands.search import param_value

        params.setdefault(strategy, {})[key] = param_value(value, f"{strategy}:{key}")
    return params


def _names(text: str) -> list[str] | None:
    """``all`` -> ``None`` (every one), ``none`` -> ``[]``, else the comma list."""
    text = text.strip()
    if text == "all":
        return None
    if text in ("none", ""):
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def _models(args) -> list[str] | None:
    """The ``--models`` list (``None`` without the flag); PlannerError when it is empty or repeats a model."""
    if args.models is None:
        return None
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        raise PlannerError(f"--models names no model: {args.models!r} (write e.g. digits-dit,digits-mmdit)")
    if len(set(models)) != len(models):
        raise PlannerError(f"--models names a model twice: {args.models!r}")
    if args.profile and len(models) > 1:
        raise PlannerError("--profile names one model's profile; with several --models leave it out (each model "
                           "uses its own from profiles/, made when missing)")
    return models


def _costs(text: str) -> list[str]:
    """The ``--costs`` list; PlannerError when it is empty, repeats one or names an unknown one."""
    from planner.profile.flop_costs import check_cost_source

    costs = [check_cost_source(c.strip()) for c in text.split(",") if c.strip()]
    if not costs or len(set(costs)) != len(costs):
        raise PlannerError(f"--costs takes measured, flops or measured,flops, got {text!r}")
    return costs


def _check_names(config) -> None:
    """PlannerError, before any model loads, for a peer or a strategy setting no run would accept."""
    from planner.bench.peers import check_peers
    from planner.search import make_strategy

    check_peers(config.peers or [])
    for strategy, params in config.params.items():
        make_strategy(strategy, params)


def _model_slug(model: str) -> str:
    from planner.profile.artifact import slug

    return slug(Path(model).name if Path(model).is_dir() else model)


def cmd_bench(args) -> int:
    import torch

    from planner.bench import BenchConfig
    from planner.bench.peers import parse_sweeps, parse_warmups
    from planner.bench.run import check_timed_seeds
    from planner.io import check_output_path
    from planner.search.budget import Budget
    from planner.seeds import evaluation_seeds, parse_seeds

    for flag, value, least in (("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0),
                               ("--calib-samples", args.calib_samples, 1), ("--reference-every", args.reference_every, 1)):
        if value < least:
            raise PlannerError(f"{flag} must be at least {least}, got {value}")
    check_max_repeats(args)
    if args.threads is not None:
        if args.threads < 1:
            raise PlannerError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    budgets = [Budget.parse(b).label() for b in args.budgets.split(",") if b.strip()]
    if not budgets:
        raise PlannerError(f"--budgets names no budget: {args.budgets!r} (write e.g. 1.5x,2x,3x)")
    if twice := next((b for i, b in enumerate(budgets) if b in budgets[:i]), None):
        raise PlannerError(f"--budgets names {twice} twice: {args.budgets!r}")
    models = _models(args)
    costs = _costs(args.costs)
    seeds = parse_seeds(args.seeds) if args.seeds else evaluation_seeds(DEFAULT_SAMPLES)
    check_timed_seeds(args.timed_seeds, len(seeds), "--timed-seeds")
    if args.out:
        check_output_path(args.out, "folder")
    targets = [Budget.parse(b).speedup for b in budgets if Budget.parse(b).speedup is not None]
    config = BenchConfig(
        budgets=budgets, costs=costs, strategies=_names(args.strategies), params=parse_strategy_params(args.param),
        peers=_names(args.peers), sweeps=parse_sweeps(args.sweep), peer_warmups=parse_warmups(args.peer_warmups),
        seeds=seeds, timed_seeds=args.timed_seeds, calib_samples=args.calib_samples, repeats=args.repeats,
        max_repeats=args.max_repeats, warmup=args.warmup,
        reference_every=args.reference_every, fewer_steps=not args.no_fewer_steps,
        top_up=not args.no_top_up, profile=args.profile,
        progress=not (args.quiet or args.json),
    )
    _check_names(config)
    if models is None:
        out = Path(args.out) if args.out else BENCH_DIR / _model_slug(args.model)
        check_output_path(out, "folder")
        payload, text = _bench_one(args, args.model, config, out, targets)
    else:
        payload, text = _bench_many(args, models, config, Path(args.out) if args.out else BENCH_DIR, targets)
    from planner.io import json_safe

    report(args, json_safe(payload), text)
    return 0


def _bench_one(args, model: str, config, out: Path, targets: list[float]) -> tuple[dict, str]:
    """Bench ``model`` into the folder ``out`` (written whole at the end); the JSON payload and the text."""
    from dataclasses import replace

    from planner.bench import run_bench
    from planner.bench.report import environment, write_outputs
    from planner.commands.sample import runner_and_sampler
    from planner.io import atomic_folder
    from planner.seeds import format_seeds

    runner, sampler = runner_and_sampler(SimpleNamespace(**{**vars(args), "model": model}))
    config = replace(config, out=out)
    # The bench folder is one artifact: written into a temporary folder, swapped in whole at the end.
    with atomic_folder(out) as staging:
        config.write_to = staging
        result = run_bench(runner, sampler, config)
        env = environment(runner)
        title = (f"{runner.spec}, {sampler.scheduler} {sampler.steps} steps, guidance {sampler.guidance:g}; "
                 f"{len(config.seeds)} held-out seeds, {env['device']}, {env['torch_threads']} threads")
        written = write_outputs(result, env, staging, targets, title)
    files = {name: str(out / Path(path).name) for name, path in written.items()}
    payload = {"out": str(out), "files": files, "wall_s": round(result.info["wall_s"], 1), "skipped": result.skipped,
               "info": {**result.info, "seeds": format_seeds(result.info["seeds"])}, "environment": env,
               "margins": result.margins(targets), "rows": result.rows}
    text = Path(files["results.md"]).read_text()
    text += f"\nbench took {result.info['wall_s']:.0f} s -> {out}/ (results.csv, results.md, pareto.png, environment.json)"
    return payload, text


def _bench_many(args, models: list[str], config, out: Path, targets: list[float]) -> tuple[dict, str]:
    """Bench each model into ``out/<model>/`` in turn, then write ``out/summary.json`` and ``out/summary.md``:
    the margins of our best strategy per model and their worst case across the models."""
    from planner.bench.margins import margins_markdown, worst_case
    from planner.bench.report import noise_summary
    from planner.io import check_output_path, write_json_atomic, write_text_atomic

    folders = {m: out / _model_slug(m) for m in models}
    if len(set(folders.values())) != len(folders):
        raise PlannerError(f"--models names two models that share a folder name: {', '.join(models)}")
    for folder in folders.values():
        check_output_path(folder, "folder")
    per_model, results, noises, texts = {}, {}, {}, []
    for model, folder in folders.items():
        payload, text = _bench_one(args, model, config, folder, targets)
        per_model[model] = payload["margins"]
        results[model] = {k: payload[k] for k in ("out", "files", "wall_s", "skipped")}
        noises[model] = payload["info"].get("timing_noise")
        texts.append(f"## {model}\n\n{text}")
    worst = worst_case(per_model)
    summary = {"models": models, "metric": "pooled PSNR (dB; MSE over all pixels of all held-out images)",
               "matching": "Pareto-front interpolation, the slowest point when all are faster, none when slower "
                           "(planner.bench.margins)",
               "targets": [f"{t:g}x" for t in targets], "worst_case": worst, "per_model": per_model,
               "timing_noise": noises,
               "results": {m: r["files"]["results.json"] for m, r in results.items()}}
    from planner.io import json_safe

    files = {"summary.json": str(out / "summary.json"), "summary.md": str(out / "summary.md")}
    md = (f"# Bench summary: {', '.join(models)}\n\n" + margins_markdown(per_model, worst) + noise_summary(noises)
          + "\nPer-model tables: " + ", ".join(f"[{m}]({folders[m].name}/results.md)" for m in models) + "\n")
    write_json_atomic(files["summary.json"], json_safe(summary))
    write_text_atomic(files["summary.md"], md)
    payload = {"out": str(out), "files": files, "models": results, "summary": summary}
    return payload, "\n\n".join(texts) + "\n\n" + md + f"\nsummary -> {files['summary.md']}, {files['summary.json']}"
