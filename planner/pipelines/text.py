"""Text-to-image and text-to-video pipelines: one family class, driven by a small table of facts.

A text pipeline is called with the embeddings of its prompts (encoded once, see
:mod:`planner.pipelines.encoding`), the guidance arguments and the sizes. What differs between
pipelines is data: what ``encode_prompt`` returns, whether it encodes the negative prompt too, how
guidance is asked for, and how the CFG branches then reach the transformer. :data:`PIPELINES` holds
those facts for diffusers 0.42 (measured on tiny fixtures: ``docs/pipelines.md``); a pipeline
outside the table gets them from its signatures and a probe run (:mod:`planner.pipelines.probe`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.runner import Family, Sampler

# How a pipeline asks for guidance, and what that makes of the CFG layout:
#   cfg         guidance_scale > 1 runs CFG (``batched`` order, or ``separate`` calls)
#   true_cfg    guidance_scale is a distilled input of the model; true_cfg_scale > 1 (with a negative
#               prompt) runs CFG as two calls per step (Flux.1, Qwen-Image)
#   distilled   guidance_scale is a distilled input; no CFG at all (Flux.2 dev)
#   guider      the pipeline's guider component holds the scale (HunyuanVideo 1.5)
GUIDANCE_KINDS = ("cfg", "true_cfg", "distilled", "guider")


@dataclass(frozen=True)
class TextFacts:
    """What the planner needs to know to drive one text pipeline class (see the module docstring)."""

    returns: tuple[str | None, ...]
    negative_in_encode: bool = True
    guidance: str = "cfg"
    cfg_layout: CfgLayout = CfgLayout.UNCOND_COND  # when CFG is on
    distilled_guidance: float | None = None  # guidance_scale passed to distilled models
    video: bool = False
    encode_settings: dict = field(default_factory=dict)
    call_settings: dict = field(default_factory=dict)
    default_steps: int = 28
    default_guidance: float = 4.5
    schedulers: tuple[str, ...] = ("default", "flow-euler")  # what --scheduler may name besides the model's own
    max_batch: int | None = None  # samples per pipeline call, when the pipeline breaks on more


_PIXART = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
# caption cleaning needs beautifulsoup4 and ftfy, which the planner does not install; without them the
# pipelines turn it off themselves (with a warning), so the planner asks for what they would do.
_NO_CLEANING = {"clean_caption": False}
_DIFFUSION = ("default", "ddim", "dpm", "euler")  # epsilon / v-prediction samplers

PIPELINES: dict[str, TextFacts] = {
    "PixArtAlphaPipeline": TextFacts(_PIXART, encode_settings=_NO_CLEANING, call_settings={"use_resolution_binning": False},
                                     default_steps=20, default_guidance=4.5, schedulers=_DIFFUSION),
    "PixArtSigmaPipeline": TextFacts(_PIXART, encode_settings=_NO_CLEANING, call_settings={"use_resolution_binning": False},
                                     default_steps=20, default_guidance=4.5, schedulers=_DIFFUSION),
    "SanaPipeline": TextFacts(_PIXART, encode_settings=_NO_CLEANING, call_settings={"use_resolution_binning": False},
                              default_steps=20, default_guidance=4.5, schedulers=("default",)),
    "StableDiffusion3Pipeline": TextFacts(
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        default_steps=28, default_guidance=7.0),
    "FluxPipeline": TextFacts(("prompt_embeds", "pooled_prompt_embeds", None), negative_in_encode=False,
                              guidance="true_cfg", cfg_layout=CfgLayout.SEPARATE, distilled_guidance=3.5,
                              default_steps=28, default_guidance=1.0),
    "ChromaPipeline": TextFacts(("prompt_embeds", None, "prompt_attention_mask", "negative_prompt_embeds", None,
                                 "negative_prompt_attention_mask"), cfg_layout=CfgLayout.SEPARATE,
                                default_steps=28, default_guidance=5.0),
    "QwenImagePipeline": TextFacts(("prompt_embeds", "prompt_embeds_mask"), negative_in_encode=False,
                                   guidance="true_cfg", cfg_layout=CfgLayout.SEPARATE, distilled_guidance=None,
                                   default_steps=50, default_guidance=4.0),
    "Flux2Pipeline": TextFacts(("prompt_embeds", None), negative_in_encode=False, guidance="distilled",
                               cfg_layout=CfgLayout.NONE, distilled_guidance=4.0, default_steps=28, default_guidance=1.0),
    "Flux2KleinPipeline": TextFacts(("prompt_embeds", None), negative_in_encode=False, cfg_layout=CfgLayout.SEPARATE,
                                    default_steps=28, default_guidance=4.0),
    "WanPipeline": TextFacts(("prompt_embeds", "negative_prompt_embeds"), cfg_layout=CfgLayout.SEPARATE, video=True,
                             default_steps=50, default_guidance=5.0, schedulers=("default",)),
    "LTXPipeline": TextFacts(_PIXART, video=True, default_steps=50, default_guidance=3.0),
    "CogVideoXPipeline": TextFacts(("prompt_embeds", "negative_prompt_embeds"), video=True, default_steps=50,
                                   default_guidance=6.0, schedulers=("default",)),
    "HunyuanVideo15Pipeline": TextFacts(("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2"),
                                        negative_in_encode=False, guidance="guider", cfg_layout=CfgLayout.SEPARATE,
                                        video=True, default_steps=50, default_guidance=6.0,
                                        # diffusers 0.42's HunyuanVideo 1.5 VAE decoder fails on a batch of 2
                                        # (its attention mask does not broadcast over the batch)
                                        max_batch=1),
}


class TextFamily(Family):
    """Drives a text pipeline from its :class:`TextFacts`: conditions are :class:`~planner.pipelines.prompts.Prompt`\\ s."""

    text = True

    def __init__(self, pipeline_class: str, facts: TextFacts):
        self.name = pipeline_class
        self.facts = facts
        self.schedulers = facts.schedulers
        self.max_batch = facts.max_batch
        self.default_sampler = Sampler("default", facts.default_steps, facts.default_guidance)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        if self.facts.guidance == "distilled":
            return CfgLayout.NONE
        return self.facts.cfg_layout if sampler.guidance > 1 else CfgLayout.NONE

    @contextlib.contextmanager
    def configured(self, pipe, sampler: Sampler):
        """A pipeline whose guider component (HunyuanVideo 1.5) runs at the sampler's guidance, for one call."""
        if self.facts.guidance != "guider" or getattr(pipe, "guider", None) is None:
            yield pipe
            return
        original = pipe.guider
        pipe.guider = original.new(guidance_scale=sampler.guidance)
        try:
            yield pipe
        finally:
            pipe.guider = original

    def call_kwargs(self, runner, conditions, sampler: Sampler) -> dict[str, Any]:
        """Embeddings of ``conditions`` (from the runner's encoder), guidance arguments, and the call settings."""
        embeds = runner.encoder.encode(conditions)
        on = self.cfg_layout(sampler) is not CfgLayout.NONE
        device, dtype = runner.pipe._execution_device, runner.transformer.dtype
        kwargs: dict[str, Any] = {}
        for name, value in embeds.items():
            if name.startswith("negative_") and not on:
                continue  # without CFG the unconditional branch is never run
            kwargs[name] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        kwargs.update(self._guidance(sampler))
        names = runner.call_names
        if "negative_prompt" in names:
            kwargs["negative_prompt"] = None  # its default "" would clash with negative_prompt_embeds
        kwargs.update({k: v for k, v in self.facts.call_settings.items() if k in names})
        return kwargs

    def _guidance(self, sampler: Sampler) -> dict[str, Any]:
        f = self.facts
        if f.guidance == "true_cfg":
            out = {"true_cfg_scale": sampler.guidance if sampler.guidance > 1 else 1.0}
            if f.distilled_guidance is not None:
                out["guidance_scale"] = f.distilled_guidance
            return out
        if f.guidance == "distilled":
            return {"guidance_scale": sampler.guidance if sampler.guidance > 1 else f.distilled_guidance}
        if f.guidance == "guider":
            return {}
        return {"guidance_scale": sampler.guidance}

    def output_field(self) -> str:
        return "frames" if self.facts.video else "images"

    def to_tensor(self, images: Any) -> torch.Tensor:
        t = images if isinstance(images, torch.Tensor) else torch.as_tensor(images)
        if self.facts.video and t.dim() == 5 and t.shape[2] in (1, 3) and t.shape[1] not in (1, 3):
            t = t.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] -> [B, C, F, H, W]
        return t.float()


def text_family(pipe) -> TextFamily:
    """The family of a text pipeline object; PlannerError when the planner has no facts for its class."""
    name = type(pipe).__name__
    facts = PIPELINES.get(name)
    if facts is None:
        for base in type(pipe).__mro__[1:]:  # a subclass of a known pipeline drives like it
            facts = PIPELINES.get(base.__name__)
            if facts is not None:
                break
    if facts is None:
        raise PlannerError(f"pipeline class {name!r} is not supported yet: docs/adding-a-model-family.md says what "
                           f"it needs (supported: {', '.join(sorted(PIPELINES))})")
    return TextFamily(name, facts)
