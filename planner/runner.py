"""The runner: one way to drive any supported pipeline for given conditions and seeds.

Profiler, search and eval all go through ``Runner.run``. Same conditions and seeds give
bit-identical outputs on CPU: every sample's noise comes from its own ``torch.Generator``
seeded with its seed, and nothing else in a run is random.

A model is named by a short *spec*: ``digits-dit`` (the embedded default), ``tiny:dit``,
``tiny:pixart``, ``tiny:sd3``, ``tiny:flux``, ``tiny:wan`` (tiny diffusers pipelines built from
config, for tests), or a local folder written by ``save_pretrained``.
"""

from __future__ import annotations

import copy
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.limits import MAX_STEPS
from planner.modules import CacheableModule, cacheable_modules, model_fingerprint


def _scheduler_classes() -> dict[str, type]:
    import diffusers

    return {
        "ddim": diffusers.DDIMScheduler,
        "ddpm": diffusers.DDPMScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "flow-euler": diffusers.FlowMatchEulerDiscreteScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
    }


@dataclass(frozen=True)
class Sampler:
    """How a pipeline is sampled: scheduler name (``default`` keeps the model's own), steps, CFG scale."""

    scheduler: str = "default"
    steps: int = 50
    guidance: float = 3.0

    def to_dict(self) -> dict:
        return asdict(self)


class Family:
    """How to drive one kind of pipeline: its conditioning inputs, CFG layout and defaults.

    Subclasses fill in the four methods; a family never touches caching (that is the executor's).
    """

    name: str = "base"
    schedulers: tuple[str, ...] = ("default",)
    default_sampler: Sampler = Sampler()

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        """How the CFG branches reach the transformer under ``sampler``."""
        raise NotImplementedError

    def make_conditions(self, pipe, n: int, seed: int) -> list[Any]:
        """``n`` deterministic calibration conditions (class labels, or per-sample prompt-embedding dicts)."""
        raise NotImplementedError

    def call_kwargs(self, pipe, conditions: list[Any], sampler: Sampler) -> dict[str, Any]:
        """The conditioning and guidance keyword arguments of ``pipe(...)`` for a batch of conditions."""
        raise NotImplementedError

    def to_tensor(self, images: Any) -> torch.Tensor:
        """The pipeline's ``images``/``frames`` output (asked for as ``"pt"`` or ``"latent"``) as a float tensor."""
        return torch.as_tensor(images).float()

    def output_field(self) -> str:
        return "images"


class Runner:
    """A loaded pipeline plus its family: runs conditions x seeds deterministically."""

    def __init__(self, pipe, family: Family, spec: str):
        self.pipe = pipe
        self.family = family
        self.spec = spec
        self._base_scheduler = pipe.scheduler
        self.transformer.eval()
        pipe.set_progress_bar_config(disable=True)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def modules(self) -> list[CacheableModule]:
        """The transformer's cacheable modules, in forward order."""
        return cacheable_modules(self.transformer)

    def fingerprint(self) -> str:
        return model_fingerprint(self.transformer)

    def resolve(self, sampler: Sampler | None) -> Sampler:
        """``sampler`` checked against this model (``None`` gives the family default)."""
        sampler = sampler or self.family.default_sampler
        if sampler.scheduler not in self.family.schedulers:
            raise PlannerError(
                f"scheduler {sampler.scheduler!r} does not fit {self.spec}; choose one of {', '.join(self.family.schedulers)}"
            )
        if isinstance(sampler.steps, bool) or not isinstance(sampler.steps, numbers.Integral) or not 1 <= sampler.steps <= MAX_STEPS:
            raise PlannerError(f"steps must be an integer from 1 to {MAX_STEPS}, got {sampler.steps!r}")
        if not isinstance(sampler.guidance, numbers.Real) or not math.isfinite(sampler.guidance):
            raise PlannerError(f"guidance must be a finite number, got {sampler.guidance!r}")
        return sampler

    def cfg_layout(self, sampler: Sampler | None = None) -> CfgLayout:
        return CfgLayout(self.family.cfg_layout(self.resolve(sampler)))

    def conditions(self, n: int, seed: int = 0) -> list[Any]:
        """``n`` deterministic conditions for calibration or evaluation."""
        return self.family.make_conditions(self.pipe, n, seed)

    def scheduler_for(self, sampler: Sampler):
        """A fresh scheduler for ``sampler`` (the model's own for ``default``), configured like the model's."""
        if sampler.scheduler == "default":
            return copy.deepcopy(self._base_scheduler)
        cls = _scheduler_classes()[sampler.scheduler]
        return cls.from_config(self._base_scheduler.config)

    @torch.no_grad()
    def run(
        self,
        conditions: list[Any],
        seeds: list[int],
        sampler: Sampler | None = None,
        *,
        output: str = "image",
        callback: Callable | None = None,
    ) -> torch.Tensor:
        """Sample one output per (condition, seed) pair, as one batch; returns a float32 CPU tensor.

        ``output="image"`` gives decoded images in [0, 1]; ``"latent"`` the final latents (cheaper:
        no VAE decode). ``callback`` is a diffusers ``callback_on_step_end``.
        """
        if len(conditions) != len(seeds):
            raise PlannerError(f"{len(conditions)} conditions but {len(seeds)} seeds")
        if output not in ("image", "latent"):
            raise PlannerError(f"output must be 'image' or 'latent', got {output!r}")
        sampler = self.resolve(sampler)
        self.pipe.scheduler = self.scheduler_for(sampler)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs = self.family.call_kwargs(self.pipe, conditions, sampler)
        kwargs.update(
            num_inference_steps=sampler.steps,
            generator=generators,
            output_type="pt" if output == "image" else "latent",
        )
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        try:
            result = self.pipe(**kwargs)
        finally:
            self.pipe.scheduler = self._base_scheduler
        return self.family.to_tensor(getattr(result, self.family.output_field())).cpu()


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a bad or unavailable name is a PlannerError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlannerError(f"device {name!r} asked for, but no CUDA GPU is visible")
    if not (name == "cpu" or name.startswith("cuda")):
        raise PlannerError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def as_runner(model, device: str = "auto") -> Runner:
    """A Runner for ``model``: a Runner as it is, a spec loaded on ``device``, or a diffusers pipeline
    whose family the zoo knows (the pipeline stays on its own device)."""
    if isinstance(model, Runner):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_runner(str(model), device=resolve_device(device))
    from planner.zoo import family_of

    return Runner(model, family_of(model), spec=type(model).__name__)


def load_runner(spec: str = "digits-dit", device: str = "cpu", dtype: torch.dtype | None = None) -> Runner:
    """Load the model a spec names (see the module docstring) on ``device``."""
    from planner.zoo import load_model

    pipe, family = load_model(spec)
    pipe.to(device)
    if dtype is not None:
        pipe.transformer.to(dtype)
    return Runner(pipe, family, spec)

