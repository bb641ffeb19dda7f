"""Where profiles live by default, and finding (or making) the one a search needs."""

from __future__ import annotations

from pathlib import Path

from planner.profile.artifact import META_FILE, Profile, default_profile_name, load_profile

PROFILES_DIR = Path("profiles")


def profile_for(runner, sampler, path: str | Path | None = None, *, samples: int = 8, progress: bool = False,
                folder: str | Path = PROFILES_DIR) -> Profile:
    """The profile at ``path``; without one, the default profile of this model, sampler and device in
    ``folder`` when it fits the model, was made on the same calibration prompts in the same dtype and holds at least
    ``samples`` calibration inputs, else a new profile made now and written there."""
    from planner.profile.core import profile_model

    found, default = existing_profile(runner, sampler, path, samples=samples, folder=folder)
    if found is not None:
        return found
    return profile_model(runner, runner.resolve(sampler), samples=samples, device=str(runner.device), out=default, progress=progress)


def existing_profile(runner, sampler, path: str | Path | None = None, *, samples: int = 8,
                     folder: str | Path = PROFILES_DIR) -> tuple[Profile | None, Path]:
    """``(profile, default folder)``: the profile :func:`profile_for` would use without making one
    (``None`` when it would profile), and the folder a new one would be written to."""
    from planner.io import recover_folder
    from planner.plan.build import config_hash
    from planner.profile.core import prompt_set_digest

    sampler = runner.resolve(sampler)
    default = Path(folder) / default_profile_name(runner.spec, sampler, str(runner.device))
    if path is not None:
        return load_profile(path), default
    recover_folder(default)
    if (default / META_FILE).is_file():
        profile = load_profile(default)
        prompts = prompt_set_digest(runner.conditions(profile.meta.samples, profile.meta.seed))
        source = profile.meta.extra.get("source", {})
        recorded = source.get("prompt_set")
        same_dtype = source.get("dtype") in (None, str(runner.dtype).removeprefix("torch."))
        same_scheduler = profile.meta.scheduler_config in (None, config_hash(runner.scheduler_for(sampler).config))
        if (profile.meta.fingerprint == runner.fingerprint() and profile.meta.samples >= samples and same_scheduler
                and recorded == prompts and same_dtype):
            return profile, default
    return None, default
