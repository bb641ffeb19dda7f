"""``planner zoo list`` and ``planner zoo train NAME``."""

from __future__ import annotations

from pathlib import Path

from planner.cli import add_json_flag, report
from planner.errors import PlannerError
from planner.limits import int_in, seed_arg

train_steps_arg = int_in(0, 10_000_000)


def register(sub) -> None:
    zoo = sub.add_parser("zoo", help="the models planner can load without downloads")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)

    lst = zoo_sub.add_parser("list", help="list the model specs")
    add_json_flag(lst)
    lst.set_defaults(func=cmd_list)

    train = zoo_sub.add_parser("train", help="rebuild a shipped model from its recipe (digits-*, digits-classifier)")
    train.add_argument("name", help="digits-dit, digits-dit-wide, digits-dit-deep, digits-mmdit or digits-classifier")
    train.add_argument("--steps", type=train_steps_arg, default=None, help="training steps (DiTs) or epochs (classifier)")
    train.add_argument("--seed", type=seed_arg, default=0)
    train.add_argument("--threads", type=int_in(1, 1024), default=None,
                       help="CPU threads (training is deterministic for a given thread count; default: torch's)")
    train.add_argument("--out", default=None, help="where to write (default: the packaged weights)")
    add_json_flag(train)
    train.set_defaults(func=cmd_train)


def cmd_list(args) -> int:
    from planner.zoo import MODELS

    rows = [{"spec": e.name, "description": e.description, "trainable": e.trainable} for e in MODELS.values()]
    text = "\n".join(f"{r['spec']:<14} {r['description']}" for r in rows)
    text += "\n(or a local folder written by save_pretrained)"
    report(args, {"models": rows}, text)
    return 0


def cmd_train(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise PlannerError(f"--steps must be at least 1, got {args.steps}")
    from planner.io import check_output_path

    if args.out:
        check_output_path(args.out, "file" if args.name == "digits-classifier" else "folder")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from planner.zoo.digits import ARCHITECTURES

    if args.name in ARCHITECTURES:
        from planner.zoo.digits import WEIGHTS_ROOT, TrainConfig, train_digits_dit

        cfg = TrainConfig(model=args.name, seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        out = Path(args.out) if args.out else WEIGHTS_ROOT / args.name
        _, record = train_digits_dit(cfg, out_dir=out, progress=not args.json)
        payload = {k: v for k, v in record.items() if k != "losses"} | {"out": str(out)}
        text = (f"trained {args.name} in {record['wall_time_s']} s, final loss "
                f"{record['final_loss_mean_last_100']:.4f}; wrote {out}")
    elif args.name == "digits-mmdit":
        from planner.zoo.mmdit import WEIGHTS_DIR, TrainConfig, train_digits_mmdit

        cfg = TrainConfig(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        out = Path(args.out) if args.out else WEIGHTS_DIR
        _, record = train_digits_mmdit(cfg, out_dir=out, progress=not args.json)
        payload = {k: v for k, v in record.items() if k != "losses"} | {"out": str(out)}
        text = (f"trained digits-mmdit in {record['wall_time_s']} s, final loss "
                f"{record['final_loss_mean_last_100']:.4f}; wrote {out} (its quality figures: "
                "benchmarks/mmdit_quality.py --card)")
    elif args.name == "digits-classifier":
        from planner.zoo.classifier import WEIGHTS_PATH, train_classifier

        out = Path(args.out) if args.out else WEIGHTS_PATH
        _, record = train_classifier(epochs=args.steps or 30, seed=args.seed, out_path=out)
        payload = record | {"out": str(out)}
        text = f"trained digits-classifier: held-out accuracy {record['held_out_accuracy']:.4f}; wrote {out}"
    else:
        names = ", ".join([*ARCHITECTURES, "digits-mmdit", "digits-classifier"])
        raise PlannerError(f"cannot train {args.name!r}: trainable models are {names}")
    report(args, payload, text)
    return 0
