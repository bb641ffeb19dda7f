"""Class-conditional pipelines: conditions are class labels.

``DiTPipeline`` batches CFG as ``[cond, null]`` with the null class hard-coded to 1000, always decodes
with the VAE (every ``output_type`` but ``"pt"`` gives decoded NHWC numpy), never scales the initial
noise by ``init_noise_sigma`` and takes no ``callback_on_step_end``. The project's own digits-dit
pipeline has its family in :mod:`planner.zoo.digits`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from planner.cfg import CfgLayout
from planner.runner import Family, Sampler


class DiTFamily(Family):
    """``DiTPipeline``: class labels in [0, num classes); CFG batched ``[cond, null]``."""

    name = "dit"
    # No "euler"/"ddpm": DiTPipeline never multiplies the initial noise by init_noise_sigma (wrong for
    # Euler), and it calls scheduler.step without a generator (DDPM would draw global-RNG noise).
    schedulers = ("default", "ddim", "dpm")
    default_sampler = Sampler(scheduler="default", steps=10, guidance=4.0)

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        return CfgLayout.COND_UNCOND if sampler.guidance > 1 else CfgLayout.NONE

    def make_conditions(self, runner, n: int, seed: int) -> list[int]:
        if runner.class_labels:
            return [runner.class_labels[(seed + i) % len(runner.class_labels)] for i in range(n)]
        num_classes = int(runner.transformer.config.num_embeds_ada_norm)
        gen = torch.Generator("cpu").manual_seed(int(seed))
        return torch.randint(0, num_classes, (n,), generator=gen).tolist()

    def call_kwargs(self, runner, conditions: list[int], sampler: Sampler) -> dict[str, Any]:
        return {"class_labels": [int(c) for c in conditions], "guidance_scale": sampler.guidance}

    def to_tensor(self, images: Any) -> torch.Tensor:
        if isinstance(images, np.ndarray):
            return torch.from_numpy(images).permute(0, 3, 1, 2).float()
        return torch.as_tensor(images).float()
