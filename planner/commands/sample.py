"""``planner sample``: run a model without caching and save a grid of its outputs."""

from __future__ import annotations

import time

import numpy as np
import torch

from planner.cli import add_json_flag, report
from planner.errors import PlannerError
from planner.limits import count_arg, seed_arg


def add_sampler_args(parser, steps: int | None = 50, guidance: float | None = 3.0, *, prompts_help: str | None = None,
                     eval_prompts: bool = False) -> None:
    """The model, sampler and condition flags shared by every command that runs a model
    (:mod:`planner.commands._args`)."""
    from planner.commands._args import add_condition_args, add_model_args, add_sampling_args

    add_model_args(parser)
    add_sampling_args(parser, steps=steps, guidance=guidance)
    add_condition_args(parser, eval_prompts=eval_prompts,
                       prompts_help=prompts_help or "calibration prompts: .txt (one a line) or .jsonl "
                                                    "(default: the shipped calibration set)")


def runner_and_sampler(args, *, prompts_as: str = "calibration", caching: bool = True):
    """Load the runner the flags name and build the sampler (flags left unset take the model's defaults)."""
    from planner.commands._args import runner_from_args, sampler_from_args

    runner = runner_from_args(args, prompts_as=prompts_as, caching=caching)
    return runner, sampler_from_args(runner, args)


def register(sub) -> None:
    p = sub.add_parser("sample", help="sample a model without caching and save a PNG grid")
    add_sampler_args(p, prompts_help="prompts to sample, in turn: .txt (one a line) or .jsonl "
                                     "(default: the shipped calibration set)")
    p.add_argument("--n", type=count_arg, default=100, help="number of samples")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the first sample (the others count up)")
    p.add_argument("--out", default="samples.png", help="PNG grid to write")
    add_json_flag(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from tqdm.auto import tqdm

    from planner.io import check_output_path, write_atomic

    if args.n < 1:
        raise PlannerError(f"--n must be at least 1, got {args.n}")
    check_output_path(args.out, "png")
    runner, sampler = runner_and_sampler(args, prompts_as="both", caching=False)
    conditions = runner.conditions(args.n, seed=args.seed)
    seeds = list(range(args.seed, args.seed + args.n))
    bar = tqdm(total=sampler.steps, desc=f"sample {args.model}", disable=args.json)

    def on_step(pipe, i, t, kwargs):
        bar.update(1)
        return kwargs

    start = time.perf_counter()
    # DiTPipeline takes no step callback: its bar just jumps to the end
    callback = on_step if "callback_on_step_end" in runner.call_names else None
    images = runner.run(conditions, seeds, sampler, callback=callback)
    seconds = time.perf_counter() - start
    bar.close()
    write_atomic(args.out, lambda tmp: image_grid(images).save(tmp, format="PNG"))

    payload = {"model": args.model, "sampler": sampler.to_dict(), "n": args.n, "seconds": round(seconds, 3), "out": args.out}
    text = f"{args.n} samples of {args.model} ({sampler.scheduler}, {sampler.steps} steps, guidance {sampler.guidance}) in {seconds:.2f} s -> {args.out}"
    if runner.meter is not None:
        from planner.evaluate import METER_LABELS, meter_scores

        payload["meter"] = meter_scores(runner, images, conditions)
        text += "\n" + ", ".join(f"{METER_LABELS.get(k, k)} {v:.3f}" for k, v in payload["meter"].items() if v is not None)
    report(args, payload, text)
    return 0


def image_grid(images: torch.Tensor, columns: int = 10, scale: int | None = None):
    """A PIL grid of ``[B, C, H, W]`` (or video ``[B, C, F, H, W]``: first frame) images in [0, 1]."""
    from PIL import Image

    x = images[:, :, 0] if images.dim() == 5 else images
    b, c, h, w = x.shape
    scale = scale or max(1, 64 // max(h, w))
    columns = min(columns, b)
    rows = -(-b // columns)
    pad = 1
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), dtype=np.float32)
    arr = x.clamp(0, 1).permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    grid = (grid * 255).round().astype(np.uint8)
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(grid[..., 0] if c == 1 else grid[..., :3], mode=mode)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
