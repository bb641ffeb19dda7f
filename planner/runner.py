"""The runner: one way to drive any supported pipeline for given conditions and seeds.

Profiler, search and eval all go through ``Runner.run``. Same conditions and seeds give
bit-identical outputs on CPU: every sample's noise comes from its own ``torch.Generator``
seeded with its seed, and nothing else in a run is random.

A model is named by a short *spec*: a zoo name (``digits-dit``, the embedded default; ``tiny:flux``
and the other tiny test pipelines), a folder written by ``save_pretrained``, a Hugging Face repo id
in the local cache, or ``module:function`` (:mod:`planner.pipelines.loading`). Text pipelines are
called with the embeddings of their prompts, encoded once (:mod:`planner.pipelines.encoding`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable

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
    """How a pipeline is sampled: scheduler name (``default`` keeps the model's own), steps, CFG scale,
    and the output size (``None``: the pipeline's default)."""

    scheduler: str = "default"
    steps: int = 50
    guidance: float = 3.0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None

    def to_dict(self) -> dict:
        """The fields as a dict; sizes only when set (what older plans and profiles hold stays the same)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("scheduler", "steps", "guidance")}

    @property
    def size(self) -> dict[str, int]:
        """The size arguments of ``pipe(...)`` that are set."""
        return {k: v for k, v in (("height", self.height), ("width", self.width), ("num_frames", self.num_frames))
                if v is not None}


class Family:
    """How to drive one kind of pipeline: its conditions, its call arguments, its CFG layout, defaults.

    Class-conditional families make their conditions (class labels); text families (``text = True``)
    take :class:`~planner.pipelines.prompts.Prompt` conditions from the runner's prompt sets. A family
    never touches caching (that is the executor's).
    """

    name: str = "base"
    text: bool = False
    schedulers: tuple[str, ...] = ("default",)
    default_sampler: Sampler = Sampler()
    max_batch: int | None = None  # samples per pipeline call (None: any); a run is split into such calls
    meter: Callable[[torch.Tensor, list], dict] | None = None  # the family's own quality scores, if any

    def cfg_layout(self, sampler: Sampler) -> CfgLayout:
        """How the CFG branches reach the transformer under ``sampler``."""
        raise NotImplementedError

    def make_conditions(self, runner: "Runner", n: int, seed: int) -> list[Any]:
        """``n`` deterministic conditions of a class-conditional family (class labels)."""
        raise NotImplementedError

    def call_kwargs(self, runner: "Runner", conditions: list[Any], sampler: Sampler) -> dict[str, Any]:
        """The conditioning and guidance keyword arguments of ``pipe(...)`` for a batch of conditions."""
        raise NotImplementedError

    def to_tensor(self, images: Any) -> torch.Tensor:
        """The pipeline's ``images``/``frames`` output (asked for as ``"pt"`` or ``"latent"``) as a float tensor."""
        return torch.as_tensor(images).float()

    def output_field(self) -> str:
        return "images"

    def configured(self, pipe, sampler: Sampler):
        """A context in which ``pipe`` runs as ``sampler`` says, beyond call arguments (e.g. a guider component)."""
        return contextlib.nullcontext(pipe)


class Runner:
    """A loaded pipeline plus its family: runs conditions x seeds deterministically.

    ``calibration_prompts`` / ``evaluation_prompts`` (text families): where conditions come from, for
    seeds below / from :data:`planner.seeds.EVAL_SEED_BASE` (default: the shipped sets); prompts without
    a negative prompt of their own take ``negative_prompt``.
    ``class_labels`` (class-conditional families): the labels conditions cycle through.
    ``call_args``: more ``pipe(...)`` arguments for every run. ``revision`` and ``dtype`` are recorded.
    ``default_sampler`` replaces the family's; ``meter`` (``(images, conditions) -> dict``) the family's
    model-specific quality scores.
    """

    def __init__(self, pipe, family: Family, spec: str, *, calibration_prompts=None, evaluation_prompts=None,
                 class_labels: list[int] | None = None, call_args: dict | None = None, revision: str | None = None,
                 embedding_cache: Path | None = None, default_sampler: Sampler | None = None,
                 meter: Callable[[torch.Tensor, list], dict] | None = None, negative_prompt: str | None = None):
        import inspect

        self.pipe = pipe
        self.family = family
        self.spec = spec
        self.revision = revision
        self.default_sampler = default_sampler or family.default_sampler
        self.meter = meter or family.meter
        self.class_labels = list(class_labels or [])
        self.call_args = dict(call_args or {})
        self.call_names = set(inspect.signature(type(pipe).__call__).parameters)
        self.negative_prompt = negative_prompt
        from planner.pipelines.prompts import as_prompt_set

        self._prompts = {"calibration": as_prompt_set(calibration_prompts, source="calibration prompts"),
                         "evaluation": as_prompt_set(evaluation_prompts, source="evaluation prompts")}
        self._embedding_cache = embedding_cache
        self._encoder = None
        self._base_scheduler = pipe.scheduler
        self._probes: dict[Sampler, _Probe] = {}
        self.transformer.eval()
        pipe.set_progress_bar_config(disable=True)

    def with_pipe(self, pipe) -> "Runner":
        """A Runner on ``pipe`` (e.g. a deep copy of this one's pipeline) that keeps every option of this one:
        spec, revision, default sampler, meter, class labels, call arguments, prompt sets, negative prompt,
        embedding cache and prompt encoder (it only encodes prompts, which a copy of the pipeline would
        encode alike)."""
        import inspect

        clone = copy.copy(self)
        clone.pipe = pipe
        clone.call_names = set(inspect.signature(type(pipe).__call__).parameters)
        clone._prompts = dict(self._prompts)
        clone._base_scheduler = pipe.scheduler
        pipe.set_progress_bar_config(disable=True)
        return clone

    @property
    def transformer(self) -> torch.nn.Module:
        """The pipeline's transformer; for a pipeline with several (Wan 2.2) the TransformerPair that every call
        of them goes through (:mod:`planner.executor.pair`), so that profiles, searches and plans see one
        module over the run's global steps."""
        from planner.executor.pair import pair_of

        pair, _ = pair_of(self.pipe)
        return pair if pair is not None else self.pipe.transformer

    def component_steps(self, sampler: Sampler | None = None) -> dict[str, list[int]] | None:
        """``{component: global steps it runs}`` for a pipeline with several transformers, else ``None``."""
        t = self.transformer
        if not hasattr(t, "steps_for"):
            return None
        return t.steps_for(self.timesteps(sampler))

    @property
    def device(self) -> torch.device:
        """Where the transformer runs (with CPU offload: the device it is moved to when it runs)."""
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def modules(self) -> list[CacheableModule]:
        """The transformer's cacheable modules, in forward order."""
        return cacheable_modules(self.transformer)

    def fingerprint(self) -> str:
        return model_fingerprint(self.transformer)

    def resolve(self, sampler: Sampler | None) -> Sampler:
        """``sampler`` checked against this model (``None`` gives the default sampler)."""
        sampler = sampler or self.default_sampler
        if sampler.scheduler not in self.family.schedulers:
            raise PlannerError(
                f"scheduler {sampler.scheduler!r} does not fit {self.spec}; choose one of {', '.join(self.family.schedulers)}"
            )
        if isinstance(sampler.steps, bool) or not isinstance(sampler.steps, numbers.Integral) or not 1 <= sampler.steps <= MAX_STEPS:
            raise PlannerError(f"steps must be an integer from 1 to {MAX_STEPS}, got {sampler.steps!r}")
        if not isinstance(sampler.guidance, numbers.Real) or not math.isfinite(sampler.guidance):
            raise PlannerError(f"guidance must be a finite number, got {sampler.guidance!r}")
        if sampler.size:
            from planner.pipelines.sizes import check_size

            check_size(self.pipe, self.call_names, sampler.height, sampler.width, sampler.num_frames)
        return sampler

    def output_size(self, sampler: Sampler | None = None) -> dict[str, int]:
        """The ``height``/``width``/``num_frames`` a run of ``sampler`` asks for where known: the sampler's
        sizes over the runner's call arguments (sizes left to the pipeline's defaults are missing)."""
        known = {k: int(v) for k, v in self.call_args.items()
                 if k in ("height", "width", "num_frames") and isinstance(v, int) and not isinstance(v, bool)}
        return {**known, **(sampler.size if sampler is not None else {})}

    def cfg_layout(self, sampler: Sampler | None = None) -> CfgLayout:
        return CfgLayout(self.family.cfg_layout(self.resolve(sampler)))

    # ------------------------------------------------------------------ conditions
    def prompts(self, purpose: str):
        """The prompt set for ``calibration`` or ``evaluation`` (the shipped one unless the runner was given one)."""
        from planner.pipelines import prompts as shipped

        if self._prompts.get(purpose) is None:
            self._prompts[purpose] = shipped.calibration_prompts() if purpose == "calibration" else shipped.evaluation_prompts()
        return self._prompts[purpose].with_negative(self.negative_prompt)

    def conditions(self, n: int, seed: int = 0) -> list[Any]:
        """``n`` deterministic conditions for calibration (seeds below the evaluation range) or evaluation:
        prompts in turn from the matching prompt set for text families, else the family's own."""
        from planner.seeds import EVAL_SEED_BASE

        if not self.family.text:
            return self.family.make_conditions(self, n, seed)
        purpose = "evaluation" if seed >= EVAL_SEED_BASE else "calibration"
        prompts = self.prompts(purpose)
        start = seed - (EVAL_SEED_BASE if purpose == "evaluation" else 0)
        return [prompts[(start + i) % len(prompts)] for i in range(n)]

    @property
    def encoder(self):
        """The prompt encoder of a text family (made on first use; embeddings cached on disk)."""
        if self._encoder is None:
            from planner.pipelines.encoding import PromptEncoder, cache_dir

            facts = self.family.facts
            cache = self._embedding_cache if self._embedding_cache is not None else cache_dir()
            settings = {**facts.encode_settings, **self.call_args}  # e.g. max_sequence_length reaches the encoder
            self._encoder = PromptEncoder(self.pipe, facts.returns, facts.negative_in_encode, settings, cache)
        return self._encoder

    def prepare(self, conditions: list[Any], release: bool = False) -> None:
        """Encode every prompt of ``conditions`` now (text families); with ``release`` take the text encoders
        off the pipeline afterwards: later runs read the cached embeddings."""
        if not self.family.text:
            return
        self.encoder.encode(conditions)
        if release:
            from planner.pipelines.encoding import release_text_encoders

            release_text_encoders(self.pipe)

    def scheduler_for(self, sampler: Sampler):
        """A fresh scheduler for ``sampler`` (the model's own for ``default``), configured like the model's."""
        if sampler.scheduler == "default":
            return copy.deepcopy(self._base_scheduler)
        cls = _scheduler_classes()[sampler.scheduler]
        return cls.from_config(self._base_scheduler.config)

    # ------------------------------------------------------------------ running
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
        no VAE decode). ``callback`` is a diffusers ``callback_on_step_end``. A prompt's own seed and
        call arguments (from a ``.jsonl`` prompt file) take precedence over ``seeds`` and the runner's.
        """
        if len(conditions) != len(seeds):
            raise PlannerError(f"{len(conditions)} conditions but {len(seeds)} seeds")
        if output not in ("image", "latent"):
            raise PlannerError(f"output must be 'image' or 'latent', got {output!r}")
        size = self.family.max_batch
        if size is not None and len(conditions) > size:
            return torch.cat([self.run(conditions[i:i + size], seeds[i:i + size], sampler, output=output, callback=callback)
                              for i in range(0, len(conditions), size)])
        sampler = self.resolve(sampler)
        seeds = [getattr(c, "seed", None) if getattr(c, "seed", None) is not None else s for c, s in zip(conditions, seeds)]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        kwargs = {**self.call_args, **_prompt_args(conditions)}
        kwargs.update({k: v for k, v in sampler.size.items() if k in self.call_names})
        kwargs.update(self.family.call_kwargs(self, conditions, sampler))
        kwargs.update(num_inference_steps=sampler.steps, generator=generators,
                      output_type="pt" if output == "image" else "latent")
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        result = self._call(kwargs, sampler, self.scheduler_for(sampler))
        return self.family.to_tensor(getattr(result, self.family.output_field())).cpu()

    def _call(self, kwargs: dict, sampler: Sampler, scheduler: Any) -> Any:
        """Call the pipeline with ``scheduler`` in place of its own (put back afterwards)."""
        self.pipe.scheduler = scheduler
        try:
            with self.family.configured(self.pipe, sampler):
                return self.pipe(**kwargs)
        finally:
            self.pipe.scheduler = self._base_scheduler

    def prompts_record(self, calib_seeds: Iterable[int] | None) -> dict | None:
        """``{"digest", "count", "keys"}`` of the prompts a text model was calibrated on with ``calib_seeds``
        (calibration seed ``s`` gets prompt number ``s``), ``None`` for other models: what a plan records and
        ``planner eval`` checks held-out prompts against (``keys``: :attr:`Prompt.text_key`)."""
        from planner.pipelines.prompts import Prompt, PromptSet

        seeds = [int(s) for s in (calib_seeds or [])]
        if not seeds or not self.family.text:
            return None
        prompts = [c for c in self.conditions(len(seeds), seed=min(seeds)) if isinstance(c, Prompt)]
        if not prompts:
            return None
        unique = list(dict.fromkeys(prompts))
        return {"digest": PromptSet(tuple(prompts), "calibration").digest, "count": len(unique),
                "keys": sorted({p.text_key for p in unique})}

    def timesteps(self, sampler: Sampler | None = None) -> list[float]:
        """The timesteps the pipeline itself sets for ``sampler``, as plain numbers ([] when it cannot
        say). Pipelines pass their own sigmas and shifts to the scheduler (Flux: a linear sigma ramp
        shifted by the image size), so they are read from a probe run (:meth:`_probe`)."""
        return list(self._probe(sampler).timesteps)

    def input_shape(self, sampler: Sampler | None = None) -> list[int] | None:
        """The shape of one sample of the transformer's ``hidden_states`` in a run of ``sampler`` (batch
        dimension left out; ``None`` when the probe run cannot say): how the run's resolution and frames
        look from inside the pipeline, where :func:`planner.apply_plan` checks them."""
        shape = self._probe(sampler).input_shape
        return list(shape) if shape is not None else None

    def _probe(self, sampler: Sampler | None) -> "_Probe":
        """What the pipeline sets up for ``sampler`` before its first transformer call: it is called and
        stopped there, so the transformer never runs (cached per sampler)."""
        sampler = self.resolve(sampler)
        if sampler not in self._probes:
            self._probes[sampler] = self._run_probe(sampler)
        return self._probes[sampler]

    def _run_probe(self, sampler: Sampler) -> "_Probe":
        scheduler = self.scheduler_for(sampler)
        set_timesteps = scheduler.set_timesteps
        seen: list[Any] = []

        @functools.wraps(set_timesteps)  # pipelines read its signature (does it take sigmas?)
        def record(*args, **kwargs):
            set_timesteps(*args, **kwargs)
            seen[:] = [scheduler.timesteps]

        def stop(module, args, kwargs):
            from planner.executor.tree import get_arg

            hidden = get_arg(type(module), "hidden_states", args, kwargs)
            raise _ProbeDone(list(hidden.shape[1:]) if isinstance(hidden, torch.Tensor) and hidden.dim() > 1 else None)

        scheduler.set_timesteps = record
        conditions = self.conditions(1, 0)
        kwargs = {**self.call_args, **_prompt_args(conditions)}
        kwargs.update({k: v for k, v in sampler.size.items() if k in self.call_names})
        kwargs.update(self.family.call_kwargs(self, conditions, sampler))
        kwargs.update(num_inference_steps=sampler.steps, generator=[torch.Generator("cpu").manual_seed(0)],
                      output_type="latent")
        # prepended: runs before any hook of an applied plan, which then never sees the stopped call
        handle = self.transformer.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
        shape = None
        try:
            self._call(kwargs, sampler, scheduler)
        except _ProbeDone as done:
            shape = done.args[0]
        except Exception:  # a pipeline that cannot run this way: what it set up before failing is kept
            pass
        finally:
            handle.remove()
        timesteps = [float(x) for x in (seen[0].tolist() if isinstance(seen[0], torch.Tensor) else seen[0])] if seen else []
        return _Probe(timesteps=tuple(timesteps), input_shape=tuple(shape) if shape is not None else None)


@dataclass(frozen=True)
class _Probe:
    """What a probe run saw: the scheduler's timesteps and one sample's transformer input shape."""

    timesteps: tuple[float, ...]
    input_shape: tuple[int, ...] | None


class _ProbeDone(Exception):
    """Stops a probe run at its first transformer call."""


def _prompt_args(conditions: list[Any]) -> dict[str, Any]:
    """The call arguments the prompts of one batch carry themselves; they must agree within the batch."""
    args = {getattr(c, "call_args", ()) for c in conditions}
    if len(args) > 1:
        raise PlannerError("prompts with different call_args cannot run in one batch: give them the same call_args, "
                           "or run them apart")
    return dict(args.pop()) if args else {}


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a bad or unavailable name is a PlannerError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PlannerError(f"device {name!r} asked for, but no CUDA GPU is visible")
    if not (name == "cpu" or name.startswith("cuda")):
        raise PlannerError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    return name


def as_runner(model, device: str = "auto", *, prompts=None, eval_prompts=None, negative_prompt: str | None = None,
              class_labels: list[int] | None = None, call_args: dict | None = None, **load: Any) -> Runner:
    """A Runner for ``model``: a Runner as it is, a spec (see :func:`load_runner`, which takes ``load``)
    loaded on ``device``, or a diffusers pipeline object (which stays where it is).

    ``prompts`` / ``eval_prompts``: calibration / evaluation prompts (a list of strings, a ``.txt`` or
    ``.jsonl`` file, or a :class:`~planner.pipelines.prompts.PromptSet`; default: the shipped sets),
    each without its own negative prompt taking ``negative_prompt``. ``class_labels``: the labels a
    class-conditional model cycles through. ``call_args``: more ``pipe(...)`` arguments for every run."""
    if isinstance(model, Runner):
        return model
    from planner.pipelines.prompts import as_prompt_set

    options = {"calibration_prompts": as_prompt_set(prompts), "evaluation_prompts": as_prompt_set(eval_prompts),
               "negative_prompt": negative_prompt, "class_labels": class_labels, "call_args": call_args}
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_runner(str(model), device=resolve_device(device), **load, **options)
    from planner.pipelines import family_for

    return Runner(model, family_for(model), spec=type(model).__name__, **options)


def make_sampler(runner: Runner, sampler: Sampler | None = None, *, scheduler: str | None = None,
                 steps: int | None = None, guidance: float | None = None, height: int | None = None,
                 width: int | None = None, num_frames: int | None = None) -> Sampler:
    """``sampler`` (default: the runner's) with the given fields replaced, checked against the model."""
    base = sampler or runner.default_sampler
    changes = {k: v for k, v in (("scheduler", scheduler), ("steps", steps), ("guidance", guidance), ("height", height),
                                 ("width", width), ("num_frames", num_frames)) if v is not None}
    return runner.resolve(replace(base, **changes))


def load_runner(spec: str = "digits-dit", device: str = "cpu", dtype: str | torch.dtype | None = None, *,
                revision: str | None = None, variant: str | None = None, offload: str = "none",
                **options) -> Runner:
    """Load the model a spec names (a zoo name, a folder, a cached Hugging Face repo id, or
    ``module:function``: :mod:`planner.pipelines.loading`) on ``device``. ``options`` go to the Runner."""
    from planner.pipelines import family_for
    from planner.pipelines.loading import load_pipeline, place

    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    loaded = load_pipeline(spec, revision=revision, variant=variant, dtype=dtype)
    place(loaded.pipe, device, offload)
    family = family_for(loaded.pipe)
    return Runner(loaded.pipe, family, loaded.spec, revision=loaded.revision, **_zoo_options(spec, family, options))


def _zoo_options(spec: str, family: Family, options: dict) -> dict:
    """``options`` completed with what the zoo entry of ``spec`` (if it is one) says its model needs."""
    from planner.pipelines.prompts import as_prompt_set
    from planner.zoo import MODELS

    entry = MODELS.get(spec)
    if entry is None:
        return options
    out = dict(options)
    out["call_args"] = {**entry.call_args, **(options.get("call_args") or {})}
    if entry.sampler:
        out["default_sampler"] = replace(family.default_sampler, **entry.sampler)
    if entry.prompts is not None:
        for purpose, texts in zip(("calibration", "evaluation"), entry.prompts()):
            if out.get(f"{purpose}_prompts") is None:
                out[f"{purpose}_prompts"] = as_prompt_set(texts, source=f"{spec} {purpose} prompts")
    out.setdefault("meter", entry.meter)
    return out
