"""Tiny randomly initialised diffusers pipelines (``tiny:dit`` ... ``tiny:wan``) and their families.

They exist for tests: each is a real diffusers pipeline class with a real transformer class, just
small enough that a 10-step run takes well under a second on a CPU. Weights are random but
deterministic (a fixed torch seed, without touching the global RNG). Text encoders and tokenizers
are ``None``: conditions are precomputed prompt embeddings drawn from a seeded generator.

Facts about the installed pipelines (diffusers 0.42) that the families encode:

* ``DiTPipeline`` batches CFG as ``[cond, null]`` with the null class hard-coded to 1000, always
  decodes with the VAE (``output_type="latent"`` gives decoded NHWC numpy, turned back into NCHW
  here), never scales the initial noise by ``init_noise_sigma`` and has no ``callback_on_step_end``.
* ``PixArtSigmaPipeline`` batches ``[uncond, cond]``, needs prompt attention masks, and swallows
  unknown keyword arguments (a ``callback_on_step_end`` is silently ignored).
* ``StableDiffusion3Pipeline`` batches ``[uncond, cond]``; it needs pooled embeddings too.
* ``FluxPipeline`` is guidance-distilled (``guidance_scale`` is embedded, one branch); true CFG
  (``true_cfg_scale > 1`` plus negative embeddings) runs two calls per step, cond then uncond.
  Its ``"latent"`` output is the packed sequence ``[B, tokens, 4 * C]``.
* ``WanPipeline`` runs two calls per step, cond then uncond; its output field is ``frames``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from planner.errors import PlannerError
from planner.cfg import CfgLayout
from planner.runner import Family, Sampler

KINDS = ("dit", "pixart", "sd3", "flux", "wan")

WEIGHT_SEED = 0
# The "empty prompt" embedding of the unconditional branch: one per model, the same for every
# sample and every condition seed, as a real text encoder's encoding of "" would be.
NULL_SEED = 1_000_003


def _null_generator() -> torch.Generator:
    return torch.Generator("cpu").manual_seed(NULL_SEED)


@contextlib.contextmanager
def _quiet_transformers():
    """Mute transformers' import-time warnings (e.g. no torchvision for image processors we never use)."""
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # the text pipelines need it; DiT does not
        yield
        return
    level = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        tf_logging.set_verbosity(level)


def _tiny_vae(latent_channels: int, sample_size: int, **extra):
    """A two-level AutoencoderKL (spatial factor 2) with 8 channels; enough to decode, nothing more."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=sample_size,
        **extra,
    )


class _TextFamily(Family):
    """Shared machinery of the text-conditioned families: per-sample embedding dicts, stacked per batch.

    ``make_conditions`` returns ``n`` dicts of CPU float tensors (no batch dimension). Keys starting
    with ``negative_`` are the unconditional branch and are passed only when CFG is on.
    """

    # Text tokens per prompt. Unequal to every tiny model's image/video token count (16, 16, 16, 8),
    # so hooks can tell the text and image streams apart by shape.
    seq_len = 6

    def _shapes(self, pipe) -> dict[str, tuple[int, ...]]:
        """Condition name -> shape of one sample's tensor, read off the transformer config."""
        raise NotImplementedError

    def _cfg_on(self, sampler: Sampler) -> bool:
        return sampler.guidance > 1

    def make_conditions(self, pipe, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        shapes = self._shapes(pipe)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        null = {k: torch.randn(s, generator=_null_generator()) for k, s in shapes.items()}
        out = []
        for _ in range(n):
            cond = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
            cond.update({f"negative_{k}": v.clone() for k, v in null.items()})
            out.append(cond)
        return out

    def _stack(self, pipe, conditions: list[dict], sampler: Sampler) -> dict[str, torch.Tensor]:
        if not conditions:
            raise PlannerError("no conditions to run")
        device = pipe._execution_device
        dtype = pipe.transformer.dtype
        keys = [k for k in conditions[0] if self._cfg_on(sampler) or not k.startswith("negative_")]
        batch = {}
        for k in keys:
            t = torch.stack([c[k] for c in conditions]).to(device)
            batch[k] = t.to(dtype) if t.is_floating_point() else t
        return batch


class TinyDiTFamily(Family):
    """``DiTPipeline``: class labels in [0, 1000); CFG batched ``[cond, null]`` (null class 1000)."""

    name = "dit"
    # No "euler"/"ddpm": DiTPipeline never multiplies the initial noise by init_noise_sigma (wrong for
    # Euler), and it calls scheduler.step without a generator (DDPM would draw global-RNG noise).
    schedulers = ("default", "ddim", "dpm")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=4.0)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.COND_UNCOND if sampler.guidance > 1 else CfgLayout.NONE

    def make_conditions(self, pipe, n: int, seed: int) -> list[int]:
        num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randint(0, num_classes, (n,), generator=gen).tolist()

    def call_kwargs(self, pipe, conditions: list[int], sampler: Sampler) -> dict[str, Any]:
        return {"class_labels": [int(c) for c in conditions], "guidance_scale": sampler.guidance}

    def to_tensor(self, images: Any) -> torch.Tensor:
        # DiTPipeline treats every output_type but "pt" as numpy NHWC of decoded images.
        if isinstance(images, np.ndarray):
            return torch.from_numpy(images).permute(0, 3, 1, 2).float()
        return torch.as_tensor(images).float()


class TinyPixArtFamily(_TextFamily):
    """``PixArtSigmaPipeline``: T5-like embeddings plus attention masks; CFG batched ``[uncond, cond]``."""

    name = "pixart"
    schedulers = ("default", "ddim", "dpm", "euler")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=4.5)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.UNCOND_COND if sampler.guidance > 1 else CfgLayout.NONE

    def _shapes(self, pipe):
        return {"prompt_embeds": (self.seq_len, int(pipe.transformer.config.caption_channels))}

    def make_conditions(self, pipe, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
        conds = super().make_conditions(pipe, n, seed)
        # Prompt lengths vary (padding masked out); the empty negative prompt is one token (EOS).
        gen = torch.Generator("cpu").manual_seed(int(seed) + 1)
        for c in conds:
            valid = int(torch.randint(2, self.seq_len + 1, (1,), generator=gen))
            c["prompt_attention_mask"] = (torch.arange(self.seq_len) < valid).long()
            c["negative_prompt_attention_mask"] = (torch.arange(self.seq_len) < 1).long()
        return conds

    def call_kwargs(self, pipe, conditions, sampler: Sampler) -> dict[str, Any]:
        size = int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor
        return {
            **self._stack(pipe, conditions, sampler),
            "guidance_scale": sampler.guidance,
            "height": size,
            "width": size,
            # Binning only knows the real sample sizes (32..256) and would resize our outputs.
            "use_resolution_binning": False,
            "negative_prompt": None,  # its default "" clashes with negative_prompt_embeds
        }


class _PooledTextFamily(_TextFamily):
    """Text families with a pooled prompt embedding next to the per-token one (SD3, Flux)."""

    def _shapes(self, pipe):
        cfg = pipe.transformer.config
        return {
            "prompt_embeds": (self.seq_len, int(cfg.joint_attention_dim)),
            "pooled_prompt_embeds": (int(cfg.pooled_projection_dim),),
        }


class TinySD3Family(_PooledTextFamily):
    """``StableDiffusion3Pipeline``: prompt + pooled embeddings; CFG batched ``[uncond, cond]``."""

    name = "sd3"
    schedulers = ("default", "flow-euler")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=5.0)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.UNCOND_COND if sampler.guidance > 1 else CfgLayout.NONE

    def call_kwargs(self, pipe, conditions, sampler: Sampler) -> dict[str, Any]:
        size = int(pipe.transformer.config.sample_size) * pipe.vae_scale_factor
        return {**self._stack(pipe, conditions, sampler), "guidance_scale": sampler.guidance, "height": size, "width": size}


class TinyFluxFamily(_PooledTextFamily):
    """``FluxPipeline``: guidance-distilled when ``guidance <= 1`` (one call), true CFG otherwise.

    True CFG passes ``true_cfg_scale=guidance`` and negative embeddings: two transformer calls per
    step, cond then uncond. Both modes embed the same distilled guidance value.
    """

    name = "flux"
    schedulers = ("default", "flow-euler")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=1.0)
    embedded_guidance = 3.5  # FluxPipeline's own default for guidance-distilled checkpoints

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.SEPARATE if sampler.guidance > 1 else CfgLayout.NONE

    def call_kwargs(self, pipe, conditions, sampler: Sampler) -> dict[str, Any]:
        # Flux has no transformer sample size; the VAE's is the image size it was built for.
        multiple = pipe.vae_scale_factor * 2
        size = int(pipe.vae.config.sample_size) // multiple * multiple
        return {
            **self._stack(pipe, conditions, sampler),
            "guidance_scale": self.embedded_guidance,
            "true_cfg_scale": sampler.guidance if sampler.guidance > 1 else 1.0,
            "height": size,
            "width": size,
        }


class TinyWanFamily(_TextFamily):
    """``WanPipeline`` (text to video): UMT5-like embeddings; CFG as two calls per step, cond then uncond."""

    name = "wan"
    schedulers = ("default", "flow-euler")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=5.0)

    def __init__(self, height: int = 32, width: int = 32, num_frames: int = 5):
        # Wan's transformer and VAE carry no sample size, so the video size is the family's.
        self.height, self.width, self.num_frames = height, width, num_frames

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.SEPARATE if sampler.guidance > 1 else CfgLayout.NONE

    def _shapes(self, pipe):
        return {"prompt_embeds": (self.seq_len, int(pipe.transformer.config.text_dim))}

    def call_kwargs(self, pipe, conditions, sampler: Sampler) -> dict[str, Any]:
        return {
            **self._stack(pipe, conditions, sampler),
            "guidance_scale": sampler.guidance,
            "height": self.height,
            "width": self.width,
            "num_frames": self.num_frames,
        }

    def output_field(self) -> str:
        return "frames"


_FAMILIES: dict[str, type[Family]] = {
    "DiTPipeline": TinyDiTFamily,
    "PixArtSigmaPipeline": TinyPixArtFamily,
    "StableDiffusion3Pipeline": TinySD3Family,
    "FluxPipeline": TinyFluxFamily,
    "WanPipeline": TinyWanFamily,
}


def family_for_pipeline(class_name: str | None) -> Family | None:
    """A fresh family for a diffusers pipeline class name, or ``None`` if we have none for it."""
    cls = _FAMILIES.get(class_name or "")
    return cls() if cls is not None else None


def load_pipeline_folder(path) -> Any:
    """A pipeline folder written by ``save_pretrained``, components saved as ``None`` (text encoders) left ``None``.

    Plain ``from_pretrained`` refuses such folders for SD3, Flux and Wan: it wants every component
    their ``__init__`` names, and saved ``None`` components are not passed back.
    """
    import json
    from pathlib import Path

    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is noise for tiny models
    index = json.loads((Path(path) / "model_index.json").read_text())
    with _quiet_transformers():
        cls = getattr(diffusers, index.get("_class_name") or "", None)
    if cls is None:
        raise PlannerError(f"{path}: pipeline class {index.get('_class_name')!r} is not in diffusers")
    missing = {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is None}
    pipe = cls.from_pretrained(str(path), **missing)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    transformer = DiTTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,  # learned sigma, as the real DiT-XL/2
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_embeds_ada_norm=1000,  # DiTPipeline hard-codes the null class as 1000
    )
    torch.manual_seed(WEIGHT_SEED)
    vae = _tiny_vae(latent_channels=4, sample_size=16)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)


def _build_pixart():
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    transformer = PixArtTransformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=8,
        patch_size=2,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,  # = heads * head_dim: captions are projected to the inner dim
        caption_channels=32,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
    )
    torch.manual_seed(WEIGHT_SEED)
    vae = _tiny_vae(latent_channels=4, sample_size=16)
    scheduler = DPMSolverMultistepScheduler(beta_schedule="linear")
    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)


def _build_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        caption_projection_dim=16,  # = heads * head_dim
        joint_attention_dim=32,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    torch.manual_seed(WEIGHT_SEED)
    vae = _tiny_vae(latent_channels=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035,
                    use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None,
    )


def _build_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=2,
        num_attention_heads=2,
        attention_head_dim=16,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # guidance-distilled, like FLUX.1-dev
        axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
    )
    torch.manual_seed(WEIGHT_SEED)
    vae = _tiny_vae(latent_channels=4, sample_size=16, shift_factor=0.1159, scaling_factor=0.3611,
                    use_quant_conv=False, use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
        text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )


def _build_wan():
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    z_dim = 4
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope splits it over (t, h, w) as 4 + 4 + 4
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    torch.manual_seed(WEIGHT_SEED)
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=z_dim,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=transformer)


_BUILDERS = {
    "dit": (_build_dit, TinyDiTFamily),
    "pixart": (_build_pixart, TinyPixArtFamily),
    "sd3": (_build_sd3, TinySD3Family),
    "flux": (_build_flux, TinyFluxFamily),
    "wan": (_build_wan, TinyWanFamily),
}


def build_tiny(kind: str) -> tuple[Any, Family]:
    """``(pipeline, family)`` for a tiny model: same weights on every call, eval mode, float32, CPU.

    The global torch RNG is left as it was.
    """
    if kind not in _BUILDERS:
        raise PlannerError(f"unknown tiny model {kind!r}: use one of {', '.join(KINDS)}")
    builder, family_cls = _BUILDERS[kind]
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(WEIGHT_SEED)
        pipe = builder()
    pipe.to("cpu")  # built in float32 already; casting here would only make diffusers warn
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe, family_cls()
