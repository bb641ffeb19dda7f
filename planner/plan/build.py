"""Making plans for a model: the model and sampler references filled in from the model itself."""

from __future__ import annotations

import datetime as _dt
from typing import Any, Iterable, Mapping

from planner.cfg import CfgLayout
from planner.plan.model import ModelRef, Plan, Prediction, Provenance, SamplerRef, normalize_decisions


def plan_for_model(
    model: Any,
    *,
    steps: int,
    cfg_layout: str = CfgLayout.NONE,
    decisions: Mapping[str, str | Mapping[str, str]] | None = None,
    scheduler: str = "default",
    scheduler_class: str | None = None,
    scheduler_config: str | None = None,
    resolution: Iterable[int] | None = None,
    frames: int | None = None,
    input_shape: Iterable[int] | None = None,
    guidance: float = 1.0,
    timesteps: Iterable[float] | None = None,
    spec: str | None = None,
    prediction: Prediction | None = None,
    strategy: str = "manual",
    params: dict | None = None,
    profile_id: str | None = None,
    calib_seeds: Iterable[int] | None = None,
    device: str | None = None,
    model_revision: str | None = None,
    dtype: str | None = None,
    prompts: dict | None = None,
    output: str | None = None,
) -> Plan:
    """A validated plan for a transformer (or a pipeline or Runner holding one) from a decisions dict.

    ``decisions`` maps module names to a code string (all branches alike) or ``{branch: codes}``;
    modules left out compute at every step, and every module of the model gets an entry. ``output``: the
    transformer output's code string (see :class:`~planner.plan.model.Plan`), ``None`` when it always runs.
    Provenance gets the planner/torch/diffusers versions and the current UTC date.
    """
    from planner.modules import cacheable_modules, class_name, model_fingerprint, transformer_of

    t = transformer_of(model)
    names = [m.name for m in cacheable_modules(t)]
    components = _components(t, timesteps)
    if device is None:
        device = str(next(t.parameters()).device) if any(True for _ in t.parameters()) else None
    plan = Plan(
        model=ModelRef(cls=class_name(t), fingerprint=model_fingerprint(t), modules=names, spec=spec,
                       components=components),
        sampler=SamplerRef(
            scheduler=scheduler,
            steps=int(steps),
            guidance=float(guidance),
            cfg_layout=CfgLayout(cfg_layout),
            timesteps=[as_number(x) for x in (timesteps or [])],
            scheduler_class=scheduler_class,
            scheduler_config=scheduler_config,
            resolution=[int(x) for x in resolution] if resolution is not None else None,
            frames=int(frames) if frames is not None else None,
            input_shape=[int(x) for x in input_shape] if input_shape is not None else None,
        ),
        decisions={},
        output=output,
        prediction=prediction or Prediction(),
        provenance=Provenance(
            strategy=strategy,
            params=dict(params or {}),
            profile_id=profile_id,
            calib_seeds=[int(s) for s in (calib_seeds or [])],
            versions=package_versions(),
            device=device,
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            model_revision=model_revision,
            dtype=dtype,
            prompts=prompts,
        ),
    )
    plan.decisions = normalize_decisions(decisions or {}, plan.branches, plan.steps, fill=names)
    return plan.validate()


def plan_for_runner(runner: Any, sampler: Any = None, decisions: Mapping[str, Any] | None = None, **kwargs: Any) -> Plan:
    """A validated plan for a Runner and Sampler (``None``: the family default): fills model, sampler
    (scheduler class, and the timesteps the pipeline sets when it can say them) and provenance; ``decisions``
    ``None`` or ``{}`` gives the all-compute (identity) plan.

    Other keyword arguments go to :func:`plan_for_model` (``prediction``, ``strategy``, ``params``,
    ``profile_id``, ``calib_seeds``). The resolution and frames of the run (and the transformer input shape
    they give), the model's revision, the
    transformer's dtype and (text models) the calibration prompts of ``calib_seeds`` are recorded.
    """
    sampler = runner.resolve(sampler)
    size = runner.output_size(sampler) if hasattr(runner, "output_size") else {}
    if "height" in size and "width" in size:
        kwargs.setdefault("resolution", [size["height"], size["width"]])
    if "num_frames" in size:
        kwargs.setdefault("frames", size["num_frames"])
    if hasattr(runner, "input_shape"):
        kwargs.setdefault("input_shape", runner.input_shape(sampler))
    kwargs.setdefault("model_revision", getattr(runner, "revision", None))
    kwargs.setdefault("dtype", str(runner.dtype).removeprefix("torch."))
    kwargs.setdefault("prompts", runner.prompts_record(kwargs.get("calib_seeds")))
    sched = runner.scheduler_for(sampler)
    scheduler_class, scheduler_config = type(sched).__name__, config_hash(sched.config)
    timesteps = runner.timesteps(sampler)
    return plan_for_model(
        runner.transformer,
        steps=sampler.steps,
        cfg_layout=runner.cfg_layout(sampler),
        decisions=decisions,
        scheduler=sampler.scheduler,
        scheduler_class=scheduler_class,
        scheduler_config=scheduler_config,
        guidance=sampler.guidance,
        timesteps=timesteps if len(timesteps) == sampler.steps else [],
        spec=runner.spec,
        device=kwargs.pop("device", str(runner.device)),
        **kwargs,
    )


def _components(transformer: Any, timesteps: Iterable[float] | None) -> dict | None:
    """``model.components`` of a TransformerPair (several transformers: which runs which step, from the run's
    timesteps); ``None`` for one transformer."""
    from planner.errors import PlannerError
    from planner.modules import model_fingerprint
    from planner.plan.components import ComponentRef

    names = getattr(transformer, "component_names", None)
    if not names:
        return None
    timesteps = list(timesteps or [])
    if not timesteps:
        raise PlannerError(f"a plan for a pipeline with {len(names)} transformers needs the run's timesteps, to know "
                           "which transformer runs which step")
    steps = transformer.steps_for(timesteps)
    return {c: ComponentRef(type(transformer.component(c)).__name__, model_fingerprint(transformer.component(c)),
                            steps[c]) for c in names}


def config_hash(config: Mapping[str, Any]) -> str:
    """A 12-hex-digit hash of a diffusers scheduler config: equal for schedulers that step alike.

    Keys starting with ``_`` (class name, diffusers version, which values were defaults) are left
    out: they do not change the trajectory."""
    import hashlib
    import json

    items = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    text = json.dumps(items, sort_keys=True, default=_plain, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def as_number(x: Any) -> float | int:
    """``x`` as an int when it is a whole number, else a float (timesteps read better so)."""
    x = float(x)
    return int(x) if x.is_integer() else x


def package_versions() -> dict:
    """The planner, torch and diffusers versions installed (``None`` for a missing package)."""
    import importlib.metadata as md

    import planner

    out = {"planner": planner.__version__}
    for pkg in ("torch", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out
