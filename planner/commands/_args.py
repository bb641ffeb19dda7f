"""The flags every command that runs a model shares, defined once: which model and how it is loaded,
how it is sampled (steps, guidance, size), and what it is conditioned on (prompts, class labels, call
arguments). Commands add the groups they need and build their runner and sampler with
:func:`runner_from_args` and :func:`sampler_from_args`.
"""

from __future__ import annotations

import argparse
from typing import Any

from planner.errors import PlannerError
from planner.limits import MAX_COUNT, finite_float, int_in, repeats_arg, steps_arg

size_arg = int_in(1, 1 << 16)  # pixels or frames; the pipeline's own multiples are checked once it is loaded
MAX_CLASS_LABELS = MAX_COUNT

MODEL_HELP = ("a zoo name (digits-dit, tiny:flux, ...), a save_pretrained folder, a Hugging Face repo id in the "
              "local cache, or module:function")


def add_model_args(parser: argparse.ArgumentParser, *, default: str | None = "digits-dit",
                   model_help: str = MODEL_HELP) -> None:
    """``--model`` and how it is loaded: ``--revision``, ``--variant``, ``--dtype``, ``--device``, ``--offload``."""
    from planner.pipelines.loading import DTYPES, OFFLOAD

    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default, help=model_help)
    g.add_argument("--revision", default=None, help="branch, tag or commit of a Hugging Face repo id (local cache only)")
    g.add_argument("--variant", default=None, help="weights variant of a folder or repo (e.g. fp16: *.fp16.safetensors)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help="load the pipeline in this dtype (default: as saved)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--offload", choices=OFFLOAD, default="none",
                   help="diffusers' CPU offload: whole models (model) or layer by layer (sequential) moved to "
                        "--device when they run; needs an accelerator for sequential")


def add_sampling_args(parser: argparse.ArgumentParser, *, steps: int | None = None, guidance: float | None = None,
                      scheduler: bool = True) -> None:
    """``--steps``, ``--guidance``, ``--scheduler`` (unless ``scheduler`` is False) and the output size."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--steps", type=steps_arg, default=steps, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=finite_float, default=guidance,
                   help="CFG scale, <= 1 turns CFG off (default: the model's)")
    if scheduler:
        g.add_argument("--scheduler", default=None, help="ddim, dpm, euler, flow-euler, ... (default: the model's own)")
    add_size_args(g)


def add_size_args(parser) -> None:
    """``--height``, ``--width``, ``--num-frames`` (default: the pipeline's own)."""
    parser.add_argument("--height", type=size_arg, default=None, help="output height in pixels (default: the pipeline's)")
    parser.add_argument("--width", type=size_arg, default=None, help="output width in pixels (default: the pipeline's)")
    parser.add_argument("--num-frames", type=size_arg, default=None, help="video frames (video pipelines)")


def add_condition_args(parser: argparse.ArgumentParser, *, prompts_help: str, eval_prompts: bool = False) -> None:
    """What the model is conditioned on: ``--prompts``, ``--negative-prompt``, ``--class-labels``,
    ``--call-arg``; with ``eval_prompts`` also ``--eval-prompts``."""
    g = parser.add_argument_group("conditions")
    g.add_argument("--prompts", default=None, metavar="FILE", help=prompts_help)
    if eval_prompts:
        g.add_argument("--eval-prompts", default=None, metavar="FILE",
                       help="held-out prompts for evaluation (.txt or .jsonl; default: the shipped evaluation set)")
    g.add_argument("--negative-prompt", default=None,
                   help="negative prompt of every prompt that has none of its own (CFG's unconditional branch)")
    g.add_argument("--class-labels", default=None, metavar="L1,L2,...",
                   help="class labels a class-conditional model cycles through (e.g. 207,360,387)")
    g.add_argument("--call-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="another argument of every pipe(...) call (VALUE read as JSON when it parses), repeatable")


def add_max_repeats_arg(parser: argparse.ArgumentParser) -> None:
    """``--max-repeats``: the timer's limit on timed rounds added while the timing is noisy."""
    parser.add_argument("--max-repeats", type=repeats_arg, default=None,
                        help="after --repeats rounds, time more rounds, up to this many in all, while the timing is "
                             "noisy (docs/eval-and-bench.md, 'Timing noise'); default: no more rounds")


def check_max_repeats(args: argparse.Namespace) -> None:
    """PlannerError unless ``--max-repeats`` is unset or at least ``--repeats``."""
    if args.max_repeats is not None and args.max_repeats < args.repeats:
        raise PlannerError(f"--max-repeats must be at least --repeats ({args.repeats}), got {args.max_repeats}")


def parse_call_args(items: list[str]) -> dict[str, Any]:
    """``["max_sequence_length=64", "clean_caption=false"]`` -> ``{"max_sequence_length": 64, "clean_caption": False}``."""
    from planner.commands.search import param_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise PlannerError(f"--call-arg takes KEY=VALUE with KEY a pipeline argument name, got {item!r}")
        if key in RESERVED_CALL_ARGS:
            raise PlannerError(f"--call-arg {key}: {RESERVED_CALL_ARGS[key]}")
        out[key] = param_value(value, key)
    return out


# Call arguments the planner sets itself: naming one with --call-arg would silently lose or fight it.
RESERVED_CALL_ARGS = {
    "prompt": "give prompts with --prompts",
    "negative_prompt": "use --negative-prompt",
    "class_labels": "use --class-labels",
    "height": "use --height", "width": "use --width", "num_frames": "use --num-frames",
    "num_inference_steps": "use --steps", "guidance_scale": "use --guidance", "true_cfg_scale": "use --guidance",
    "generator": "inputs are seeded by the planner", "output_type": "the planner chooses the output type",
    "latents": "inputs are seeded by the planner", "callback_on_step_end": "the planner's own",
    "return_dict": "the planner reads the pipeline's output object",
}


def parse_class_labels(text: str | None) -> list[int] | None:
    """``"207,360"`` -> ``[207, 360]`` (``None`` stays ``None``)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise PlannerError(f"--class-labels takes comma-separated non-negative integers, got {text[:60]!r}")
    if len(parts) > MAX_CLASS_LABELS:
        raise PlannerError(f"--class-labels: at most {MAX_CLASS_LABELS} labels")
    return [int(p) for p in parts]


def condition_options(args: argparse.Namespace, *, prompts_as: str = "calibration") -> dict[str, Any]:
    """The Runner options the condition flags give. ``prompts_as``: what ``--prompts`` is (``calibration``,
    ``evaluation``, or ``both`` for commands that just sample them). Prompt files are read here, before
    any model loads, so a bad file fails fast."""
    from planner.pipelines.prompts import as_prompt_set

    prompts = as_prompt_set(getattr(args, "prompts", None))
    evaluation = as_prompt_set(getattr(args, "eval_prompts", None))
    calibration = None
    if prompts_as in ("calibration", "both"):
        calibration = prompts
    if prompts_as in ("evaluation", "both") and prompts is not None:
        evaluation = prompts
    elif calibration is not None and evaluation is not None:
        from planner.pipelines.prompts import check_held_out_prompts

        try:
            check_held_out_prompts(evaluation.prompts, {p.text_key for p in calibration.prompts})
        except PlannerError:
            raise PlannerError(f"--eval-prompts {evaluation.source} shares prompts with --prompts {calibration.source}: "
                               "held-out prompts must be new to the search") from None
    return {"prompts": calibration, "eval_prompts": evaluation,
            "negative_prompt": getattr(args, "negative_prompt", None),
            "class_labels": parse_class_labels(getattr(args, "class_labels", None)),
            "call_args": parse_call_args(getattr(args, "call_arg", []) or [])}


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loading keyword arguments of :func:`planner.runner.load_runner` the model flags give."""
    return {"revision": getattr(args, "revision", None), "variant": getattr(args, "variant", None),
            "dtype": getattr(args, "dtype", None), "offload": getattr(args, "offload", "none") or "none"}


def runner_from_args(args: argparse.Namespace, model: str | None = None, *, prompts_as: str = "calibration",
                     caching: bool = True):
    """The Runner the model and condition flags describe (``model`` overrides ``--model``). (``caching`` is
    kept for callers: every pipeline a Runner drives can be profiled and planned, Wan 2.2 included.)"""
    from planner.runner import load_runner, resolve_device

    options = condition_options(args, prompts_as=prompts_as)
    device = resolve_device(getattr(args, "device", "auto"))
    check_offload(device, load_options(args)["offload"])
    conditions = {"calibration_prompts": options["prompts"], "evaluation_prompts": options["eval_prompts"],
                  "negative_prompt": options["negative_prompt"], "class_labels": options["class_labels"],
                  "call_args": options["call_args"] or None}
    runner = load_runner(model or args.model, device=device, **load_options(args), **conditions)
    check_conditions_fit(runner, options)
    return runner


def check_offload(device: str, offload: str) -> None:
    """PlannerError for an offload mode this device cannot run."""
    if offload == "sequential" and device == "cpu":
        # accelerate's layer-by-layer hooks move weights to the meta device and back, which fails on a
        # CPU-only run (TypeError inside accelerate); and with the CPU as the target there is nothing to offload.
        raise PlannerError("--offload sequential moves layers from the CPU to an accelerator; with --device cpu "
                           "there is nowhere to offload to (use --offload none or model)")


def check_conditions_fit(runner, options: dict[str, Any]) -> None:
    """PlannerError when the condition flags do not fit the model (prompts for a class-conditional model, ...)."""
    text = runner.family.text
    if not text and (options["prompts"] is not None or options["eval_prompts"] is not None or options["negative_prompt"]):
        raise PlannerError(f"{runner.spec} is class-conditional ({type(runner.pipe).__name__}): it takes --class-labels, "
                           "not prompts")
    if text and options["class_labels"] is not None:
        raise PlannerError(f"{runner.spec} is a text pipeline ({type(runner.pipe).__name__}): it takes --prompts, "
                           "not --class-labels")
    labels = options["class_labels"]
    classes = _class_count(runner)
    if labels and classes is not None and max(labels) >= classes:
        raise PlannerError(f"--class-labels {max(labels)}: {runner.spec} has classes 0..{classes - 1}")
    # Names outside the explicit signature are refused even where __call__ has **kwargs: diffusers keeps
    # those for deprecated arguments, and a misspelt name would be dropped without a word.
    unknown = [k for k in options["call_args"] if k not in runner.call_names or _is_var_keyword(runner, k)]
    if unknown:
        raise PlannerError(f"--call-arg {unknown[0]}: {type(runner.pipe).__name__} takes no argument of that name")


def _class_count(runner) -> int | None:
    """How many classes a class-conditional transformer embeds (``None`` when its config does not say)."""
    config = getattr(runner.transformer, "config", None)
    for key in ("num_embeds_ada_norm", "num_classes"):
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _is_var_keyword(runner, name: str) -> bool:
    import inspect

    param = inspect.signature(type(runner.pipe).__call__).parameters.get(name)
    return param is not None and param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL)


def sampler_from_args(runner, args: argparse.Namespace, base=None):
    """The sampler the flags describe: ``base`` (default: the model's) with the flags that were given
    replaced, checked against the model (scheduler, steps, and a size the VAE and patches can take)."""
    from planner.runner import make_sampler

    return make_sampler(runner, base, scheduler=getattr(args, "scheduler", None), steps=getattr(args, "steps", None),
                        guidance=getattr(args, "guidance", None), height=getattr(args, "height", None),
                        width=getattr(args, "width", None), num_frames=getattr(args, "num_frames", None))
