"""`digits-dit`: the embedded default model, a class-conditional pixel-space DiT on sklearn's digits.

Why it exists: no weights can be downloaded, yet profiles and plans only mean something on a
*trained* model. This file holds its pipeline, its data and the recipe that trains it; the
weights it produced ship in ``planner/zoo/weights/digits-dit``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel, ImagePipelineOutput
from diffusers.models.embeddings import LabelEmbedding
from diffusers.utils.torch_utils import randn_tensor

from planner.cfg import CfgLayout
from planner.runner import Family, Sampler

NUM_CLASSES = 10
WEIGHTS_ROOT = Path(__file__).parent / "weights"
WEIGHTS_DIR = WEIGHTS_ROOT / "digits-dit"

TRANSFORMER_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,  # epsilon only: a learned-sigma channel would stay untrained
    patch_size=2,
    num_layers=8,
    num_attention_heads=4,
    attention_head_dim=16,
    num_embeds_ada_norm=NUM_CLASSES,  # label table has NUM_CLASSES + 1 rows; the last is the CFG null class
    norm_num_groups=32,
)

# The digit models of the development suite: one recipe, other shapes, so that a change to a search
# strategy is judged on more than one network (depth 4 to 12, width 64 and 128). A 12-block shape of
# width 32 with patch 1 was tried and dropped: in 1000 steps it did not learn its class conditioning.
ARCHITECTURES: dict[str, dict] = {
    "digits-dit": TRANSFORMER_CONFIG,
    "digits-dit-wide": TRANSFORMER_CONFIG | dict(num_layers=4, num_attention_heads=4, attention_head_dim=32),
    "digits-dit-deep": TRANSFORMER_CONFIG | dict(num_layers=12),
}

# DDIM's default clip_sample=True wrecks many-step CFG sampling in pixel space.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,
)


def load_digits_data() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's bundled digits as ``([1797, 1, 8, 8] float in [-1, 1], [1797] int64 labels)``; offline."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images * 2 - 1, torch.tensor(digits.target, dtype=torch.int64)


class DigitsDiTPipeline(DiffusionPipeline):
    """Class-conditional sampling from a pixel-space DiT, CFG batched as DiT does it: ``[cond, null]``.

    Works with any diffusers scheduler that has ``set_timesteps``/``step`` (DDIM by default,
    DPMSolverMultistep, Euler, ...). ``output_type``: ``"pil"``, ``"np"`` (``[B, H, W, 1]`` in
    [0, 1]), ``"pt"`` (``[B, 1, H, W]`` in [0, 1]) or ``"latent"`` (the raw sample in [-1, 1]).
    """

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, transformer: DiTTransformer2DModel, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @property
    def null_class(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        device = self._execution_device
        labels = torch.as_tensor(class_labels, device=device).reshape(-1).long()
        if (labels < 0).any() or (labels >= self.null_class).any():
            raise ValueError(f"class labels must lie in [0, {self.null_class - 1}], got {labels.tolist()}")
        batch = labels.numel()
        cfg = self.transformer.config
        shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.transformer.dtype)
        latents = latents * self.scheduler.init_noise_sigma

        do_cfg = guidance_scale > 1
        if do_cfg:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents, latents]) if do_cfg else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = t.reshape(1).to(device).expand(model_input.shape[0])
            eps = self.transformer(model_input, timestep=timestep, class_labels=labels).sample
            if do_cfg:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(eps, t, latents).prev_sample

            if callback_on_step_end is not None:
                local = {"latents": latents}
                outputs = callback_on_step_end(
                    self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                )
                latents = outputs.pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = (latents / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


def load_digits_pipeline(path: str | Path | None = None) -> DigitsDiTPipeline:
    """A shipped digit model (a name of :data:`ARCHITECTURES`; digits-dit by default) or the one saved at
    ``path``, in eval mode, float32, on CPU."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is noise for a 3 MiB model
    folder = WEIGHTS_ROOT / path if path in ARCHITECTURES else (path or WEIGHTS_DIR)
    pipe = DigitsDiTPipeline.from_pretrained(str(folder))
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class TrainConfig:
    """The recipe that produced the shipped weights (see the model cards); ``model`` names the shape."""

    model: str = "digits-dit"
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    seed: int = 0


def warmup_cosine(step: int, *, steps: int, warmup_steps: int) -> float:
    """The learning-rate factor of the zoo's recipes: linear warm-up, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_digits_dit(
    cfg: TrainConfig, out_dir: str | Path | None = None, progress: bool = True
) -> tuple[DigitsDiTPipeline, dict]:
    """Train the digit model ``cfg.model`` from scratch; deterministic for a given ``cfg`` and thread count.

    Returns the EMA pipeline and a record (loss curve, wall time, ...). With ``out_dir`` the
    pipeline, a model card and the loss curve are written there (each file atomically).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images, labels = load_digits_data()
    model = DiTTransformer2DModel(**ARCHITECTURES[cfg.model])
    # Each block's LabelEmbedding would drop labels on its own in train mode; drop them once, here.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps=cfg.steps, warmup_steps=cfg.warmup_steps))

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.model}", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x0, y = images[idx], labels[idx].clone()
        y[torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout] = NUM_CLASSES
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1 - cfg.ema_decay)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    wall = time.perf_counter() - start

    pipe = DigitsDiTPipeline(transformer=ema, scheduler=DDIMScheduler(**SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    record = {
        "train_config": asdict(cfg),
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "final_loss_mean_last_100": float(np.mean(losses[-100:])),
        "losses": losses,
    }
    if out_dir is not None:
        save_digits_model(pipe, record, out_dir)
    return pipe, record


def save_digits_model(pipe: DigitsDiTPipeline, record: dict, out_dir: str | Path) -> Path:
    """Write the pipeline folder, ``loss_curve.csv`` and ``MODEL_CARD.md`` into ``out_dir``, swapped in whole
    (an interrupted save never leaves a half-written model behind)."""
    from planner.io import atomic_folder, write_text_atomic

    with atomic_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_text_atomic(tmp / "loss_curve.csv", loss_curve_csv(record["losses"]))
        write_text_atomic(tmp / "MODEL_CARD.md", _model_card(pipe, record))
    return Path(out_dir)


def loss_curve_csv(losses: list[float]) -> str:
    """A training loss curve as CSV: ``step,loss,loss_mean50`` (the mean of the 50 steps up to each)."""
    return "step,loss,loss_mean50\n" + "".join(
        f"{i},{v:.6f},{np.mean(losses[max(0, i - 49): i + 1]):.6f}\n" for i, v in enumerate(losses)
    )


def _model_card(pipe: DigitsDiTPipeline, record: dict) -> str:
    import diffusers

    import planner

    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    losses = record["losses"]
    checkpoints = [0, 99, 499, 999, 1999, len(losses) - 1]
    curve = "\n".join(
        f"| {i + 1} | {np.mean(losses[max(0, i - 49): i + 1]):.4f} |" for i in checkpoints if i < len(losses)
    )
    cfg = record["train_config"]
    name = cfg.get("model", "digits-dit")
    role = ("It is dit-cache-planner's embedded\ndefault model" if name == "digits-dit" else
            "It is one of the other shapes of\nthe development suite (`digits-dit` is the default)")
    return f"""# {name}

A class-conditional Diffusion Transformer (diffusers `DiTTransformer2DModel`) in pixel space,
trained by this project on scikit-learn's bundled digits. {role}: small enough to ship and to profile on a laptop CPU, trained so that its blocks
really differ from step to step.

| | |
|---|---|
| architecture | {json.dumps(ARCHITECTURES[name])} |
| parameters | {n_params:,} ({n_params * 4 / 2**20:.1f} MiB fp32) |
| data | `sklearn.datasets.load_digits`: 1797 grey 8x8 images, 10 classes, scaled to [-1, 1] |
| objective | epsilon prediction, 1000-step linear DDPM schedule (beta 1e-4 to 0.02) |
| CFG | labels dropped to the null class {NUM_CLASSES} with p={cfg['label_dropout']} in the training loop (per-block label dropout disabled) |
| optimiser | AdamW lr {cfg['lr']}, weight decay {cfg['weight_decay']}, {cfg['warmup_steps']} warm-up steps then cosine decay, batch {cfg['batch_size']} |
| steps | {cfg['steps']}, EMA decay {cfg['ema_decay']} (the EMA weights are shipped) |
| seed | {cfg['seed']} (training is deterministic for a given thread count) |
| wall time | {record['wall_time_s']} s on {record['threads']} CPU threads |
| final loss | {record['final_loss_mean_last_100']:.4f} (mean of the last 100 steps) |
| sampler | `DDIMScheduler` with `clip_sample=False` (shipped); any diffusers scheduler works |
| versions | planner {planner.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__} |

Loss (mean of the 50 steps up to the step shown; the whole curve is `loss_curve.csv`):

| step | loss |
|---|---|
{curve}

Rebuild with `planner zoo train {name}` (writes this folder).
"""


class DigitsFamily(Family):
    """Runner family of digits-dit: conditions are class labels, CFG batched ``[cond, null]``."""

    name = "digits"
    schedulers = ("default", "ddim", "ddpm", "dpm", "euler", "unipc")
    default_sampler = Sampler(scheduler="ddim", steps=50, guidance=3.0)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.COND_UNCOND if sampler.guidance > 1 else CfgLayout.NONE

    def make_conditions(self, runner, n: int, seed: int) -> list[int]:
        # Classes in turn from a seed-chosen start, so any n >= 10 covers every digit evenly.
        labels = runner.class_labels or list(range(NUM_CLASSES))
        return [labels[(seed + i) % len(labels)] for i in range(n)]

    def call_kwargs(self, runner, conditions: list[int], sampler: Sampler) -> dict:
        return {"class_labels": list(conditions), "guidance_scale": sampler.guidance}


def digit_meter(images: torch.Tensor, labels: list[int]) -> dict[str, float | None]:
    """The digit models' own quality scores: the classifier's ``accuracy`` against the intended labels and the
    ``frechet`` distance of classifier features to the real digits (``None`` below 2 images)."""
    from planner.metrics import digit_accuracy, digit_frechet_distance

    return {"accuracy": digit_accuracy(images, labels),
            "frechet": digit_frechet_distance(images) if len(images) >= 2 else None}
