"""The profile artifact: a folder with ``meta.json`` and two tables, and its typed in-memory form.

Layout of ``profiles/<name>/``::

    meta.json            metadata (schema below); records the sha256 and row count of each table
    similarity.csv.gz    one row per step x module x branch x lag (gzip with a fixed mtime, so
                         equal data gives equal bytes)
    cost.csv             one row per cacheable module, plus the ``fixed`` rows
    *.png                plots (``planner profile plot``), not part of the integrity check

The folder is one artifact: :meth:`Profile.save` writes all of it into a temporary sibling folder
and swaps that in whole (:func:`planner.io.atomic_folder`), so a kill, an I/O error or a second
writer at any instant leaves the old profile or the new one, complete, never tables of one and a
meta.json of the other; leftovers of killed writers go with the next write. :func:`load_profile`
re-checks every hash anyway, reads at most ``MAX_ARTIFACT_BYTES`` of meta.json, and refuses values a
profile cannot hold (non-finite or negative costs, NaN similarities where a comparison exists).
Nothing is pickled.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from planner.artifact import DocumentFormat, loads_json
from planner.cfg import CfgLayout
from planner.errors import PlannerError
from planner.io import atomic_folder, json_text, read_text_limited, recover_folder
from planner.runner import Sampler

# 1.1.0: the sampler also records its scheduler's class and config hash.
# 1.2.0: ``cfg_comparison`` records CFG comparisons that took part of an output (planner.profile.branch_parts).
PROFILE_FORMAT = DocumentFormat(name="dit-cache-profile", version="1.2.0", noun="profile",
                                version_key="schema_version", schema_file="profile.schema.json")
SCHEMA_VERSION = PROFILE_FORMAT.version
META_FILE = "meta.json"
SIMILARITY_FILE = "similarity.csv.gz"
COST_FILE = "cost.csv"

SIMILARITY_KEYS = ["step", "timestep", "module", "kind", "block", "branch", "lag", "n"]
SIMILARITY_TEXT_KEYS = ("module", "kind", "branch")  # every other column of the table holds numbers
COST_KEYS = [
    "module", "kind", "block", "parent", "scope", "batch", "latency_ms", "latency_iqr_ms", "latency_half_ms",
    "self_ms", "self_half_ms", "flops", "self_flops", "reuse_ms", "reuse_residual_ms", "forecast_ms",
    "share_cfg_ms", "out_numel", "hook_ms",
]
# Cost columns added after format 1.1.0's first profiles: read and checked when present; where absent, the
# latency model estimates them (planner.profile.timing.REUSE_FALLBACKS).
OPTIONAL_COST_KEYS = ["forecast2_ms", "forecast2_limited_ms"]


class ProfileError(PlannerError):
    """A profile that cannot be read: missing, truncated, edited, or of another schema version."""


@dataclass(frozen=True)
class ModuleInfo:
    """One cacheable module as the profile recorded it (``parent`` is the enclosing block, or None)."""

    name: str
    kind: str
    block: int
    cls: str
    parent: str | None


@dataclass(frozen=True)
class ProfileMeta:
    """Everything ``meta.json`` says, typed. ``extra`` keeps keys this version does not know."""

    name: str
    created: str
    model_spec: str
    model_class: str
    fingerprint: str
    modules: tuple[ModuleInfo, ...]
    sampler: Sampler
    cfg_layout: str
    branches: tuple[str, ...]
    timesteps: tuple[float, ...]
    samples: int
    seed: int
    seeds: tuple[int, ...]
    conditions: tuple
    batch: int
    lags: int
    device: dict
    versions: dict
    durations_s: dict
    timing: dict
    latency: dict
    flops: dict
    tables: dict
    warnings: tuple[str, ...] = ()
    schema_version: str = SCHEMA_VERSION
    extra: dict = field(default_factory=dict)
    scheduler_class: str | None = None  # since 1.1.0; None in older profiles
    scheduler_config: str | None = None  # planner.plan.build.config_hash of the scheduler's config

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def to_dict(self) -> dict:
        """The ``meta.json`` object."""
        return {
            "schema": PROFILE_FORMAT.name,
            "schema_version": self.schema_version,
            "name": self.name,
            "created": self.created,
            "model": {
                "spec": self.model_spec,
                "class": self.model_class,
                "fingerprint": self.fingerprint,
                "modules": [m.__dict__ for m in self.modules],
            },
            "sampler": {
                **self.sampler.to_dict(),
                **({"scheduler_class": self.scheduler_class} if self.scheduler_class else {}),
                **({"scheduler_config": self.scheduler_config} if self.scheduler_config else {}),
                "cfg_layout": self.cfg_layout,
                "branches": list(self.branches),
                "timesteps": list(self.timesteps),
            },
            "calibration": {
                "samples": self.samples,
                "seed": self.seed,
                "seeds": list(self.seeds),
                "conditions": list(self.conditions),
                "batch": self.batch,
            },
            "lags": self.lags,
            "device": self.device,
            "versions": self.versions,
            "durations_s": self.durations_s,
            "timing": self.timing,
            "latency": self.latency,
            "flops": self.flops,
            "tables": self.tables,
            "warnings": list(self.warnings),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ProfileMeta":
        """Parse a ``meta.json`` object that already passed :func:`validate_meta`."""
        known = {"schema", "schema_version", "name", "created", "model", "sampler", "calibration", "lags", "device",
                 "versions", "durations_s", "timing", "latency", "flops", "tables", "warnings"}
        s, c, m = d["sampler"], d["calibration"], d["model"]
        return cls(
            name=d["name"],
            created=d["created"],
            model_spec=m["spec"],
            model_class=m["class"],
            fingerprint=m["fingerprint"],
            modules=tuple(ModuleInfo(**x) for x in m["modules"]),
            sampler=Sampler(scheduler=s["scheduler"], steps=int(s["steps"]), guidance=float(s["guidance"]),
                            **{k: int(s[k]) for k in ("height", "width", "num_frames") if s.get(k) is not None}),
            cfg_layout=s["cfg_layout"],
            branches=tuple(s["branches"]),
            timesteps=tuple(float(t) for t in s["timesteps"]),
            samples=int(c["samples"]),
            seed=int(c["seed"]),
            seeds=tuple(int(x) for x in c["seeds"]),
            conditions=tuple(c["conditions"]),
            batch=int(c["batch"]),
            lags=int(d["lags"]),
            device=d["device"],
            versions=d["versions"],
            durations_s=d["durations_s"],
            timing=d["timing"],
            latency=d["latency"],
            flops=d["flops"],
            tables=d["tables"],
            warnings=tuple(d.get("warnings", ())),
            schema_version=d["schema_version"],
            extra={k: v for k, v in d.items() if k not in known},
            scheduler_class=s.get("scheduler_class"),
            scheduler_config=s.get("scheduler_config"),
        )


class Profile:
    """A loaded (or freshly measured) profile: typed metadata plus the two tables as DataFrames.

    ``similarity`` columns: ``step, timestep, module, kind, block, branch, lag, n`` and, each as
    ``_{mean,std,min,max}`` over the calibration samples: ``rel_l1`` and ``cos`` of the output,
    ``res_rel_l1`` and ``res_cos`` of the residual (output minus input), and ``res_reuse_rel_l1``,
    the error a residual reuse puts on the output relative to the output's size (compare it with
    ``rel_l1`` to choose between reusing the output and reusing the residual). ``lag`` 1..k compares with the output
    k steps back; ``lag`` 0 compares a branch with the other CFG branch at the same step (what
    sharing CFG would cost). Rows are dense; NaN where a comparison does not exist (step < lag,
    no residual).

    ``cost`` columns: ``module, kind, block, parent, scope, batch, latency_ms, latency_iqr_ms,
    latency_half_ms, self_ms, self_half_ms, flops, self_flops, reuse_ms, reuse_residual_ms,
    forecast_ms, share_cfg_ms, out_numel, hook_ms`` and, in profiles made since those actions,
    ``forecast2_ms`` and ``forecast2_limited_ms``. ``latency_*`` includes a block's children, ``self_*``
    excludes them; ``*_half_*`` is one branch of batched CFG. Rows of kind ``fixed`` are the costs
    outside the cached modules with ``scope`` ``call`` (per transformer call), ``step`` or ``run``.
    ``hook_ms`` is what the executor's hook adds to each call of the module once a plan hooks it.
    """

    def __init__(self, meta: ProfileMeta, similarity: pd.DataFrame, cost: pd.DataFrame, path: Path | None = None,
                 raw: dict | None = None):
        self.meta = meta
        self.similarity = similarity
        self.cost = cost
        self.path = path
        # Shard profiles only: the raw statistics (planner.profile.shard), saved as stats.safetensors.
        self.raw = raw

    def __repr__(self) -> str:
        m = self.meta
        return (f"Profile({m.name!r}: {m.model_spec}, {m.sampler.scheduler} {m.steps} steps, guidance {m.sampler.guidance:g}, "
                f"{len(m.modules)} modules, {m.samples} samples, {m.device.get('type')})")

    @property
    def steps(self) -> int:
        return self.meta.steps

    @property
    def branches(self) -> tuple[str, ...]:
        return self.meta.branches

    @property
    def module_names(self) -> list[str]:
        """Cacheable module names in forward order (the order of compute masks)."""
        return [m.name for m in self.meta.modules]

    def latency_model(self, costs: str = "measured"):
        """The :class:`~planner.profile.latency.LatencyModel` this profile's costs define: its own costs
        (``measured``: times on its device, or FLOPs for a profile made with ``--costs flops``) or, with
        ``costs="flops"``, its FLOP counts (:mod:`planner.profile.flop_costs`)."""
        from planner.profile.flop_costs import flop_cost_table
        from planner.profile.latency import LatencyModel

        components = self.meta.extra.get("components")
        table, hook_ms = self.cost, self.meta.latency.get("hook_ms", 0.0)
        if self.priced_by(costs) != self.priced_by():  # FLOPs asked of a profile that measured its costs
            table = flop_cost_table(self.cost, self.meta.flops.get("transformer"), self.meta.cfg_layout,
                                    len(components or ()) or 1, where=f"profile {self.meta.name}")
            hook_ms = 0.0
        return LatencyModel.from_cost_table(table, self.meta.cfg_layout, self.steps, hook_ms, components=components)

    def priced_by(self, costs: str = "measured") -> str:
        """What :meth:`latency_model` with ``costs`` prices plans by: ``flops`` when asked for, or when the
        profile's own costs are FLOPs (``--costs flops``); ``measured`` otherwise."""
        from planner.profile.flop_costs import check_cost_source

        return "flops" if check_cost_source(costs) == "flops" or self.meta.latency.get("source") == "flops" else "measured"

    def curve(self, lag: int = 1, branch: str | None = None, metric: str = "rel_l1_mean", residual: bool = False) -> pd.DataFrame:
        """``metric`` as a ``[steps x modules]`` frame (modules in forward order) for one lag; ``branch``
        None averages the branches."""
        col = ("res_" if residual else "") + metric
        df = self.similarity[self.similarity.lag == lag]
        if branch is not None:
            df = df[df.branch == branch]
        wide = df.pivot_table(index="step", columns="module", values=col, aggfunc="mean", dropna=False)
        return wide.reindex(index=range(self.steps), columns=self.module_names)

    def stability(self, lag: int = 1, residual: bool = False, skip_first: int = 0) -> pd.DataFrame:
        """Per module: mean, median and max over steps (from ``skip_first`` on, both branches averaged)
        of the mean relative L1 at ``lag``, sorted from most to least stable."""
        c = self.curve(lag=lag, residual=residual).iloc[skip_first:]
        kinds = {m.name: m.kind for m in self.meta.modules}
        out = pd.DataFrame({"kind": [kinds[n] for n in c.columns], "mean": c.mean(), "median": c.median(), "max": c.max()})
        return out.sort_values("mean")

    def save(self, path: str | Path) -> Path:
        """Write this profile to the folder ``path`` as a whole (see the module docstring): the folder
        afterwards holds this profile and nothing else (plots of an earlier profile there are dropped)."""
        folder = Path(path)
        tables = {}
        with atomic_folder(folder) as staging:
            # Four significant digits are plenty for similarities and keep the big table small.
            for key, df, fname, fmt in (("similarity", self.similarity, SIMILARITY_FILE, "%.4g"),
                                        ("cost", self.cost, COST_FILE, "%.6g")):
                data = df.to_csv(index=False, float_format=fmt, lineterminator="\n").encode()
                if fname.endswith(".gz"):
                    # no file name and a fixed mtime in the gzip header: equal tables give equal bytes
                    data = gzip.compress(data, compresslevel=6, mtime=0)
                (staging / fname).write_bytes(data)
                tables[key] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "rows": int(len(df)),
                               "columns": list(df.columns)}
            if self.raw is not None:
                from planner.profile.shard import STATS_FILE, stats_bytes

                data = stats_bytes(self.raw)
                (staging / STATS_FILE).write_bytes(data)
                tables["stats"] = {"file": STATS_FILE, "sha256": hashlib.sha256(data).hexdigest(),
                                   "rows": int(self.raw["n"].size), "columns": sorted(self.raw)}
            meta = ProfileMeta(**{**self.meta.__dict__, "tables": tables})
            (staging / META_FILE).write_text(json_text(meta.to_dict()), encoding="utf-8")
        self.meta, self.path = meta, folder
        return folder


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def slug(text: str) -> str:
    """``text`` reduced to a file-name-safe slug (``tiny:pixart`` -> ``tiny-pixart``)."""
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "model"


def default_profile_name(spec: str, sampler: Sampler, device: str) -> str:
    """``<model>_<scheduler><steps>_g<guidance>_<device type>``, e.g. ``digits-dit_ddim50_g3_cpu``."""
    model = slug(Path(spec).name if Path(spec).is_dir() else spec)
    size = "".join(f"_{k[0]}{v}" for k, v in sampler.size.items())  # _h512_w512_n81 when sizes are set
    return f"{model}_{slug(sampler.scheduler)}{sampler.steps}_g{sampler.guidance:g}{size}_{slug(device.split(':')[0])}"


def validate_meta(d: Any, where: str = META_FILE) -> dict:
    """``d`` checked as a ``meta.json`` object this planner can read (see :mod:`planner.artifact`);
    :class:`ProfileError` otherwise."""
    try:
        return PROFILE_FORMAT.check(d, where)
    except ProfileError:
        raise
    except PlannerError as exc:
        raise ProfileError(str(exc)) from None


def load_profile(path: str | Path) -> Profile:
    """Load and check a profile folder (or its ``meta.json``).

    Promises: the schema version is readable, meta.json matches the JSON Schema, every table's
    sha256 and row count match what meta.json recorded, and the tables have the expected columns and
    modules. Any failure raises :class:`ProfileError` with a one-line reason.
    """
    p = Path(path)
    folder = p.parent if p.name == META_FILE else p
    meta_path = folder / META_FILE
    recover_folder(folder)  # a writer killed in the middle of its swap (see planner.io)
    if not folder.exists():
        raise ProfileError(f"{folder}: no such profile")
    if not folder.is_dir():
        raise ProfileError(f"{folder}: not a profile folder")
    if not meta_path.is_file():
        raise ProfileError(f"{folder}: no {META_FILE} (not a profile folder)")
    try:
        raw = loads_json(read_text_limited(meta_path, "profile meta.json"), str(meta_path))
    except PlannerError as exc:
        raise ProfileError(f"{exc}; the file is damaged or was edited") from None
    meta = ProfileMeta.from_dict(validate_meta(raw, str(meta_path)))
    if len(set(meta.branches)) != len(meta.branches) or len(meta.branches) != len(CfgLayout(meta.cfg_layout).branches):
        raise ProfileError(f"{meta_path}: $.sampler.branches {list(meta.branches)} do not fit cfg_layout {meta.cfg_layout!r}")
    if meta.lags > meta.steps:
        raise ProfileError(f"{meta_path}: $.lags is {meta.lags}, more than the {meta.steps} steps")
    if len(meta.seeds) != meta.samples or len(meta.conditions) != meta.samples:
        raise ProfileError(f"{meta_path}: $.calibration records {len(meta.seeds)} seeds and {len(meta.conditions)} "
                           f"conditions for its {meta.samples} samples")
    n_lags = meta.lags + (1 if len(meta.branches) == 2 else 0)
    expected = {"similarity": meta.steps * len(meta.modules) * len(meta.branches) * n_lags, "cost": None}

    frames = {}
    for key, fname in (("similarity", SIMILARITY_FILE), ("cost", COST_FILE)):
        info = meta.tables.get(key)
        if info is None:
            raise ProfileError(f"{meta_path}: no entry for the {key} table")
        tpath = folder / info["file"]
        if not tpath.is_file():
            raise ProfileError(f"{tpath}: missing ({key} table of the profile)")
        if tpath.stat().st_size > MAX_TABLE_BYTES:
            raise ProfileError(f"{tpath}: larger than any profile table ({MAX_TABLE_BYTES // 2**20} MiB at most)")
        want = expected[key]
        if want is not None and info["rows"] != want:
            raise ProfileError(f"{meta_path}: $.tables.{key}.rows is {info['rows']}, expected steps x modules x "
                               f"branches x lags = {want}")
        digest = sha256_file(tpath)
        if digest != info["sha256"]:
            raise ProfileError(f"{tpath}: checksum mismatch (sha256 {digest[:12]}..., meta.json says {info['sha256'][:12]}...): the file is truncated or was edited; re-run `planner profile`")
        try:
            # never more rows than meta.json promises: a small compressed file cannot expand without bound
            frames[key] = pd.read_csv(tpath, keep_default_na=True, nrows=info["rows"] + 1)
        except Exception as exc:  # noqa: BLE001 - pandas raises many kinds for a damaged table
            raise ProfileError(f"{tpath}: unreadable table ({type(exc).__name__}: {str(exc)[:120]})") from None
        if len(frames[key]) != info["rows"]:
            raise ProfileError(f"{tpath}: {len(frames[key])} rows, meta.json says {info['rows']}")

    sim, cost = frames["similarity"], frames["cost"]
    raw = None
    if "stats" in meta.tables:  # a shard's raw statistics (planner.profile.shard)
        from planner.profile.shard import read_stats

        info = meta.tables["stats"]
        spath = folder / info["file"]
        if not spath.is_file():
            raise ProfileError(f"{spath}: missing (raw statistics of a shard profile)")
        digest = sha256_file(spath)
        if digest != info["sha256"]:
            raise ProfileError(f"{spath}: checksum mismatch (sha256 {digest[:12]}..., meta.json says {info['sha256'][:12]}...): the file is truncated or was edited")
        raw = read_stats(spath)
    from planner.profile.similarity import similarity_columns

    _require_columns(sim, SIMILARITY_KEYS + similarity_columns(), folder / SIMILARITY_FILE)
    _require_columns(cost, COST_KEYS, folder / COST_FILE)
    cost["parent"] = cost["parent"].fillna("")
    names = [m.name for m in meta.modules]
    if set(sim.module.unique()) != set(names) or set(cost[cost.kind != "fixed"].module) != set(names):
        raise ProfileError(f"{folder}: tables and meta.json list different modules")
    _check_cost_rows(cost, meta.modules, folder / COST_FILE)
    _check_similarity_rows(sim, meta, folder / SIMILARITY_FILE)
    _check_values(sim, cost, folder, meta.steps, meta.extra.get("components"),
                  unmeasured_cfg=_unmeasured_cfg(meta, meta_path))
    return Profile(meta, sim, cost, folder, raw=raw)


# Where a cost outside the cached modules is paid: once per transformer call, per sampling step, per run.
FIXED_SCOPES = ("call", "step", "run")


def _check_cost_rows(cost: pd.DataFrame, modules, where: Path) -> None:
    """ProfileError unless every row of the cost table has a known ``scope`` and each cached module's row
    gives the kind, block and parent ``meta.json`` gives it (they decide what a plan is predicted to cost)."""
    bad = ~cost["scope"].isin(FIXED_SCOPES)
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise ProfileError(f"{where}: column scope holds {str(cost['scope'].iloc[row])[:40]!r} in row {row + 1}; "
                           f"scopes are {', '.join(FIXED_SCOPES)}")
    info = {m.name: m for m in modules}
    cached = cost[cost.kind != "fixed"]
    names = cached["module"]
    bad = cached["kind"] != names.map(lambda n: info[n].kind)
    bad |= cached["parent"] != names.map(lambda n: info[n].parent or "")
    bad |= pd.to_numeric(cached["block"], errors="coerce") != names.map(lambda n: info[n].block)
    if bad.any():
        r = cached[bad].iloc[0]
        m = info[r["module"]]
        raise ProfileError(f"{where}: the row of {m.name} gives kind {r['kind']}, block {r['block']}, parent "
                           f"{r['parent'] or 'none'}; meta.json gives {m.kind}, {m.block}, {m.parent or 'none'}")


def _check_similarity_rows(sim: pd.DataFrame, meta: ProfileMeta, where: Path) -> None:
    """ProfileError unless every row of the similarity table gives its module's kind and block as ``meta.json``
    does, one of the profile's CFG branches, and a count ``n`` of at least 0."""
    kinds = sim["module"].map({m.name: m.kind for m in meta.modules})
    blocks = sim["module"].map({m.name: m.block for m in meta.modules})
    bad = (sim["kind"] != kinds) | (pd.to_numeric(sim["block"], errors="coerce") != blocks)
    bad |= ~sim["branch"].isin(meta.branches) | ~(pd.to_numeric(sim["n"], errors="coerce") >= 0)
    if bad.any():
        i = int(bad.to_numpy().argmax())
        r = sim.iloc[i]
        raise ProfileError(f"{where}: row {i + 1} ({r['module']}: kind {r['kind']}, block {r['block']}, branch "
                           f"{str(r['branch'])[:20]}, n {r['n']}) disagrees with meta.json or holds a negative count")


# Cost columns every row must have, finite and >= 0; the other numeric cost columns may be empty (NaN:
# not measured, e.g. FLOPs with --no-flops, reuse costs of the fixed rows) but never negative or infinite.
REQUIRED_COSTS = ["latency_ms", "latency_half_ms", "self_ms", "self_half_ms"]
MAX_TABLE_BYTES = 1 << 30


def _unmeasured_cfg(meta: ProfileMeta, where: Path) -> set[str]:
    """The modules whose CFG comparison ``meta.json`` says could not be measured (``cfg_comparison``, see
    :mod:`planner.profile.branch_parts`); ProfileError for a record of a module the profile does not have."""
    from planner.profile.branch_parts import META_KEY, unmeasured_modules

    unknown = sorted(set(meta.extra.get(META_KEY) or {}) - {m.name for m in meta.modules})  # shapes: the schema
    if unknown:
        raise ProfileError(f"{where}: $.{META_KEY} names a module the profile does not have: {unknown[0]}")
    return unmeasured_modules(meta.extra)


def _check_values(sim: pd.DataFrame, cost: pd.DataFrame, folder: Path, steps: int, components: dict | None = None,
                  unmeasured_cfg: set[str] = frozenset()) -> None:
    """ProfileError for values no profile holds: text in a column of numbers, costs non-finite or negative,
    similarities infinite or negative (cosines outside [-1, 1]), NaN output similarities where the
    comparison exists (lag 0, or step >= lag; lag 0 of the modules in ``unmeasured_cfg`` does not exist:
    their branches' outputs never agreed in shape), steps or lags out of range."""
    import numpy as np

    where = folder / COST_FILE
    for col in COST_KEYS + [c for c in OPTIONAL_COST_KEYS if c in cost.columns]:
        if col in ("module", "kind", "parent", "scope", "block"):
            continue
        values = pd.to_numeric(cost[col], errors="coerce").to_numpy(dtype=float)
        bad_text = cost[col].notna().to_numpy() & np.isnan(values)
        if bad_text.any():
            raise ProfileError(f"{where}: column {col} holds a value that is not a number (row {int(np.argmax(bad_text)) + 1})")
        missing = np.isnan(values)
        if col in REQUIRED_COSTS and missing.any():
            raise ProfileError(f"{where}: column {col} is empty in row {int(np.argmax(missing)) + 1}: costs must be measured")
        present = values[~missing]
        if not np.isfinite(present).all() or (present < 0).any():
            raise ProfileError(f"{where}: column {col} holds a negative or infinite cost; costs are finite and >= 0")
    where = folder / SIMILARITY_FILE
    for col in sim.columns:
        if col not in SIMILARITY_TEXT_KEYS and not pd.api.types.is_numeric_dtype(sim[col]):
            raise ProfileError(f"{where}: column {col} holds a value that is not a number")
    step = sim["step"].to_numpy()
    lag = sim["lag"].to_numpy()
    if (step < 0).any() or (step >= steps).any() or (lag < 0).any() or (lag > steps).any():
        raise ProfileError(f"{where}: step or lag outside the profile's {steps} steps")
    exists = ((lag == 0) & ~sim["module"].isin(list(unmeasured_cfg)).to_numpy()) | ((lag > 0) & (step >= lag))
    if components:  # several transformers (Wan 2.2): a module has no output at the steps its transformer skips
        from planner.plan.components import absent_steps

        gone = absent_steps(components, sim["module"].unique(), steps)
        for module, missing in gone.items():
            rows = (sim["module"] == module).to_numpy()
            exists &= ~(rows & (np.isin(step, list(missing)) | np.isin(step - lag, list(missing))))
    for col in sim.columns:
        if col in SIMILARITY_KEYS or not pd.api.types.is_numeric_dtype(sim[col]):
            continue
        values = sim[col].to_numpy(dtype=float)
        if np.isinf(values).any():
            raise ProfileError(f"{where}: column {col} holds an infinite value")
        if col in ("rel_l1_mean", "cos_mean") and np.isnan(values[exists]).any():
            row = int(np.flatnonzero(exists & np.isnan(values))[0]) + 1
            raise ProfileError(f"{where}: column {col} is NaN in row {row}, where the comparison exists "
                               "(NaN only where step < lag)")
        present = values[~np.isnan(values)]
        if "rel_l1" in col and (present < 0).any():
            raise ProfileError(f"{where}: column {col} holds a negative relative L1")
        if "cos" in col and ((present < -1.001) | (present > 1.001)).any():
            raise ProfileError(f"{where}: column {col} holds a cosine outside [-1, 1]")


def _require_columns(df: pd.DataFrame, cols: list[str], where: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ProfileError(f"{where}: missing columns {', '.join(missing)}")
