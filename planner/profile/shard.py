"""Sharded profiles: ``planner profile --shard i/N`` profiles a contiguous slice of the calibration
samples; ``planner profile merge DIR...`` joins N such shards into the profile one run would give.

A shard's slice is ``numpy.array_split(range(samples), N)[i]``: contiguous, the first
``samples % N`` shards one sample longer. Contiguous slices keep each shard's micro-batches the
ones a single run makes whenever the slice length is a multiple of ``--batch-size``, so then every
per-sample figure is bit-identical and the merged statistics equal the single run's up to the
order of float64 additions.

A shard's folder is a complete profile of its slice plus two things: ``meta.json`` says
``"shard": {"index", "count", "samples", "indices"}``, and ``stats.safetensors`` holds the raw
statistics (float64 ``sum``, ``sq``, ``min``, ``max``, ``n`` per step x module x branch x lag x metric)
that make the merge exact. The merged profile's similarity table is rebuilt from the summed
statistics; its **costs are shard 0's** (its cost pass timed shard 0's first micro-batch, the same
inputs a single run's cost pass uses), and the merged ``meta.json`` lists every shard it came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from planner.errors import PlannerError
from planner.profile.branch_parts import META_KEY as CFG_KEY, merge_records
from planner.profile.artifact import Profile, load_profile
from planner.profile.similarity import RAW_KEYS, merge_raw, stats_table

STATS_FILE = "stats.safetensors"
STATS_AXES = "step,module,branch,lag_slot,metric"
_SPEC = re.compile(r"^\s*(-?\d+)\s*/\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "ShardSpec":
        """``"1/4"`` -> ShardSpec(1, 4); a one-line PlannerError for anything else."""
        m = _SPEC.match(str(text))
        if not m:
            raise PlannerError(f"--shard takes INDEX/COUNT such as 0/4, got {text!r}")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1:
            raise PlannerError(f"--shard {text}: the count must be at least 1")
        if not 0 <= index < count:
            raise PlannerError(f"--shard {text}: the index must be in 0..{count - 1} (shards are numbered from 0)")
        return cls(index, count)

    def indices(self, samples: int) -> list[int]:
        """The calibration sample indices of this shard (a contiguous slice, see the module docstring)."""
        if self.count > samples:
            raise PlannerError(f"--shard {self}: {self.count} shards need at least {self.count} calibration samples, got {samples}")
        return [int(i) for i in np.array_split(np.arange(samples), self.count)[self.index]]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def as_shard(shard) -> ShardSpec | None:
    """``None``, a ShardSpec, ``"i/N"`` or ``(i, N)`` as a ShardSpec (or None)."""
    if shard is None or isinstance(shard, ShardSpec):
        return shard
    if isinstance(shard, str):
        return ShardSpec.parse(shard)
    index, count = shard
    return ShardSpec.parse(f"{index}/{count}")


def shard_name(name: str, spec: ShardSpec) -> str:
    """``digits-dit_ddim50_g3_cpu`` -> ``digits-dit_ddim50_g3_cpu_shard0of4``."""
    return f"{name}_shard{spec.index}of{spec.count}"


def stats_bytes(raw: dict[str, np.ndarray]) -> bytes:
    """The raw statistics as safetensors bytes (deterministic for equal arrays)."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(raw[k], dtype=np.float64) for k in RAW_KEYS}, metadata={"axes": STATS_AXES})


def read_stats(path: Path) -> dict[str, np.ndarray]:
    """Raw statistics from a ``stats.safetensors`` file (checked for the five arrays of one shape)."""
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except Exception as exc:
        raise PlannerError(f"{path}: unreadable statistics ({type(exc).__name__}: {str(exc)[:100]})") from None
    shapes = {raw[k].shape for k in RAW_KEYS if k in raw}
    if set(raw) != set(RAW_KEYS) or len(shapes) != 1:
        raise PlannerError(f"{path}: expected arrays {', '.join(RAW_KEYS)} of one shape")
    return raw


def _shard_of(profile: Profile) -> dict:
    shard = profile.meta.extra.get("shard")
    if not isinstance(shard, dict) or profile.raw is None:
        raise PlannerError(f"{profile.path}: not a shard profile (made without --shard, or without its {STATS_FILE})")
    return shard


def _same(what: str, values: list, paths: list) -> None:
    if any(v != values[0] for v in values[1:]):
        bad = next(i for i, v in enumerate(values) if v != values[0])
        raise PlannerError(f"cannot merge: {paths[bad]} has another {what} than {paths[0]} ({values[bad]!r} vs {values[0]!r})")


def merge_profiles(paths: list[str | Path], name: str | None = None) -> Profile:
    """The profile of all shards in ``paths`` together (see the module docstring). Checks that they are
    shards of one model (fingerprint), sampler, CFG layout, lags, token sample, seed and sample count,
    and cover shards 0..N-1 exactly once; a one-line PlannerError otherwise. Writes nothing."""
    if not paths:
        raise PlannerError("merge needs the shard folders to merge")
    profiles = [load_profile(p) for p in paths]
    labels = [str(p) for p in paths]
    shards = [_shard_of(p) for p in profiles]
    metas = [p.meta for p in profiles]
    _same("model (fingerprint)", [m.fingerprint for m in metas], labels)
    _same("model class", [m.model_class for m in metas], labels)
    _same("sampler", [m.sampler.to_dict() for m in metas], labels)
    _same("CFG layout", [m.cfg_layout for m in metas], labels)
    _same("number of lags", [m.lags for m in metas], labels)
    _same("module list", [[x.name for x in m.modules] for m in metas], labels)
    _same("token sample", [m.extra.get("token_sample") for m in metas], labels)
    _same("calibration seed", [m.seed for m in metas], labels)
    _same("shard count", [s.get("count") for s in shards], labels)
    _same("total sample count", [s.get("samples") for s in shards], labels)
    _same("timesteps", [list(m.timesteps) for m in metas], labels)
    count = int(shards[0]["count"])
    seen: dict[int, str] = {}
    for s, label in zip(shards, labels):
        i = int(s["index"])
        if i in seen:
            raise PlannerError(f"cannot merge: shard {i}/{count} is given twice ({seen[i]} and {label})")
        seen[i] = label
    missing = [i for i in range(count) if i not in seen]
    if missing:
        raise PlannerError(f"cannot merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing; all {count} are needed")
    order = sorted(range(len(profiles)), key=lambda j: int(shards[j]["index"]))
    profiles = [profiles[j] for j in order]
    shards = [shards[j] for j in order]
    indices = [i for s in shards for i in s["indices"]]
    if indices != list(range(int(shards[0]["samples"]))):
        raise PlannerError("cannot merge: the shards' sample indices do not cover 0..N-1 once (edited meta.json?)")
    shapes = {p.raw["n"].shape for p in profiles}
    if len(shapes) != 1:
        raise PlannerError("cannot merge: the shards' statistics have different shapes")

    raw = merge_raw([p.raw for p in profiles])
    base = profiles[0]
    m0 = base.meta
    sim = stats_table(raw, m0.modules, m0.branches, m0.lags, m0.timesteps)
    warnings = list(m0.warnings)
    for p in profiles[1:]:
        warnings += [w for w in p.meta.warnings if w not in warnings]
    extra = {k: v for k, v in m0.extra.items() if k not in ("shard", CFG_KEY)}
    cfg_records = merge_records([p.meta.extra.get(CFG_KEY) for p in profiles])
    if cfg_records:
        extra[CFG_KEY] = cfg_records
    extra["merged_from"] = {
        "shards": [{"name": p.meta.name, "index": int(s["index"]), "samples": len(s["indices"]),
                    "created": p.meta.created, "device": p.meta.device} for p, s in zip(profiles, shards)],
        "costs": f"shard 0 ({base.meta.name}): its cost pass timed its first micro-batch",
        "durations": "durations_s are sums over the shards",
    }
    durations = {k: round(sum(float(p.meta.durations_s.get(k, 0.0)) for p in profiles), 3) for k in m0.durations_s}
    meta = replace(
        m0,
        name=name or re.sub(r"_shard\d+of\d+$", "", m0.name),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        samples=len(indices),
        seeds=tuple(s for p in profiles for s in p.meta.seeds),
        conditions=tuple(c for p in profiles for c in p.meta.conditions),
        durations_s=durations,
        warnings=tuple(warnings),
        tables={},
        extra=extra,
    )
    return Profile(meta, sim, base.cost.copy())
