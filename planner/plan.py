"""The cache plan: plain data saying, per module, step and CFG branch, compute or how to reuse.

A plan is keyed by module name like diffusers' ``_tp_plan``. Each module's decisions are one
string per CFG branch with one character per step, so a person reads them at a glance and a
``git diff`` of two plans shows exactly which steps changed::

    "transformer_blocks.3.attn1": "CCRCRCRCRC..."                       # both branches alike
    "transformer_blocks.7":       {"cond": "CCDDC...", "uncond": "CCSSC..."}

Modules a plan does not name are computed at every step. On disk a plan is JSON with a schema
name and a semantic version; :func:`load_plan` checks it against ``planner/schemas/plan.schema.json``
and then against the rules the schema cannot express (string lengths, first step computes, ...),
and every error names the JSON path and what was expected, on one line.

Versioning: a file of an older or equal minor version of our major version loads; a newer minor
loads with its unknown fields ignored (and a warning); another major version is refused.

This module imports neither torch nor diffusers at import time, so ``planner plan show`` is quick.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

from planner.errors import PlannerError

from planner.modules import module_kind  # noqa: F401  (re-exported: plan users ask for it here)

SCHEMA_NAME = "dit-cache-plan"
SCHEMA_VERSION = "1.0.0"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "plan.schema.json"

# One character per action, in the plan file.
ACTION_CODES = {
    "C": "compute",  # run the module and refresh its cache
    "R": "reuse",  # last computed output (sub-layers: before gate/residual)
    "D": "reuse_residual",  # this step's input + last computed (output - input); blocks only
    "F": "forecast",  # first-order extrapolation from the last two computed outputs
    "S": "share_cfg",  # copy the other CFG branch's fresh output of this step
}
CODE_OF = {name: code for code, name in ACTION_CODES.items()}
COMPUTE = "C"
BRANCHES = ("cond", "uncond")

# CFG layouts: how the two guidance branches reach the transformer.
CFG_NONE = "none"  # one branch (guidance off, or guidance-distilled)
CFG_COND_UNCOND = "cond_uncond"  # one batched call, [cond, uncond] halves (DiT)
CFG_UNCOND_COND = "uncond_cond"  # one batched call, [uncond, cond] halves (PixArt, SD3)
CFG_SEPARATE = "separate"  # two calls per step, cond then uncond (Flux true CFG, Wan)
CFG_LAYOUTS = (CFG_NONE, CFG_COND_UNCOND, CFG_UNCOND_COND, CFG_SEPARATE)

def json_path(*keys: str | int) -> str:
    """A JSONPath for error messages: ``$.decisions["transformer_blocks.3"].cond``."""
    out = "$"
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            out += f".{key}"
        else:
            out += f"[{json.dumps(key)}]"
    return out


@dataclass
class ModelRef:
    """The model a plan was made for: transformer class, fingerprint, cacheable module names (forward order)."""

    cls: str
    fingerprint: str
    modules: list[str]
    spec: str | None = None


@dataclass
class SamplerRef:
    """The sampler a plan assumes; ``cfg_layout`` is one of ``planner.runner.CFG_LAYOUTS``."""

    scheduler: str
    steps: int
    guidance: float
    cfg_layout: str
    timesteps: list[float] = field(default_factory=list)
    scheduler_class: str | None = None


@dataclass
class Prediction:
    """What the search predicted for the plan (``None`` where it did not say); ``metric`` names ``calib_error``."""

    speedup: float | None = None
    latency_fraction: float | None = None
    calib_error: float | None = None
    metric: str | None = None


@dataclass
class Provenance:
    """Where a plan came from."""

    strategy: str = "manual"
    params: dict = field(default_factory=dict)
    profile_id: str | None = None
    calib_seeds: list[int] = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    device: str | None = None
    created: str | None = None


def branches_of(cfg_layout: str) -> tuple[str, ...]:
    """The CFG branches a layout has: ``("cond",)`` for ``none``, else ``("cond", "uncond")``."""
    return ("cond",) if cfg_layout == CFG_NONE else BRANCHES


@dataclass
class Plan:
    """A cache plan. ``decisions[module][branch]`` is a string of action codes, one per step.

    In memory every named module has one string per branch of the plan's CFG layout (see
    :func:`branches_of`); on disk branches that agree are written once.
    """

    model: ModelRef
    sampler: SamplerRef
    decisions: dict[str, dict[str, str]]
    prediction: Prediction = field(default_factory=Prediction)
    provenance: Provenance = field(default_factory=Provenance)

    # ----------------------------------------------------------------- reading
    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def branches(self) -> tuple[str, ...]:
        """The CFG branches this plan has decisions for."""
        return branches_of(self.sampler.cfg_layout)

    def code(self, module: str, step: int, branch: str = "cond") -> str:
        """The action code for ``module`` at ``step`` on ``branch`` (``C`` for modules not in the plan)."""
        per_branch = self.decisions.get(module)
        if per_branch is None:
            return COMPUTE
        return per_branch[branch][step]

    def action(self, module: str, step: int, branch: str = "cond") -> str:
        """Like :meth:`code`, as the action's full name (``compute``, ``reuse``, ...)."""
        return ACTION_CODES[self.code(module, step, branch)]

    def codes(self, module: str, branch: str = "cond") -> str:
        """The whole per-step code string of ``module`` on ``branch`` (all ``C`` for modules not in the plan)."""
        per_branch = self.decisions.get(module)
        return per_branch[branch] if per_branch is not None else COMPUTE * self.steps

    def is_all_compute(self, module: str) -> bool:
        """Whether ``module`` computes at every step on every branch."""
        per_branch = self.decisions.get(module)
        return per_branch is None or all(set(s) == {COMPUTE} for s in per_branch.values())

    def compute_mask(self) -> dict[str, dict[str, list[bool]]]:
        """``{module: {branch: [own compute runs at step k]}}`` for every module of the model.

        True means the plan asks the module itself to compute (code ``C``); it ignores the module
        hierarchy (a sub-layer marked ``C`` inside a reused block does not run: see
        :meth:`effective_compute`).
        """
        return {
            m: {b: [c == COMPUTE for c in self.codes(m, b)] for b in self.branches}
            for m in self._all_modules()
        }

    def effective_compute(self, modules: Iterable[Any] | None = None) -> dict[str, dict[str, list[bool]]]:
        """Like :meth:`compute_mask`, resolving the hierarchy: a sub-layer computes only where its block does.

        ``modules`` may be ``runner.modules()`` (``CacheableModule`` objects) or names; by default
        the plan's own module list. This is what really runs, the latency model's input.
        """
        names = self._names(modules)
        mask = self.compute_mask()
        out: dict[str, dict[str, list[bool]]] = {}
        for name in names:
            own = mask.get(name) or {b: [True] * self.steps for b in self.branches}
            _, parent = module_kind(name)
            if parent is None or parent not in mask:
                out[name] = {b: list(v) for b, v in own.items()}
            else:
                out[name] = {b: [o and p for o, p in zip(own[b], mask[parent][b])] for b in self.branches}
        return out

    def leaf_modules(self, modules: Iterable[Any] | None = None) -> list[str]:
        """The compute units the plan's computed fraction counts: sub-layers, and blocks that have none."""
        names = self._names(modules)
        parents = {module_kind(n)[1] for n in names} - {None}
        return [n for n in names if module_kind(n)[0] != "block" or n not in parents]

    def computed_fraction_per_step(self, modules: Iterable[Any] | None = None) -> list[float]:
        """Per step, the fraction of (leaf module, branch) pairs that really compute (see :meth:`leaf_modules`)."""
        eff = self.effective_compute(modules)
        leaves = self.leaf_modules(modules)
        denom = max(1, len(leaves) * len(self.branches))
        return [
            sum(eff[m][b][k] for m in leaves for b in self.branches) / denom for k in range(self.steps)
        ]

    def action_counts(self) -> dict[str, int]:
        """How many (module, branch, step) decisions use each action, by full action name."""
        counts = {name: 0 for name in ACTION_CODES.values()}
        for m in self._all_modules():
            for b in self.branches:
                for c in self.codes(m, b):
                    counts[ACTION_CODES[c]] += 1
        return counts

    def _all_modules(self) -> list[str]:
        extra = [m for m in self.decisions if m not in set(self.model.modules)]
        return list(self.model.modules) + extra

    def _names(self, modules: Iterable[Any] | None) -> list[str]:
        if modules is None:
            return self._all_modules()
        return [m if isinstance(m, str) else m.name for m in modules]

    # ----------------------------------------------------------------- checking
    def validate(self) -> "Plan":
        """Check the rules the schema cannot express; raise PlannerError naming the JSON path. Returns self.

        Rules: every code string has ``steps`` characters; branches match the CFG layout; step 0
        computes (``C``, or ``S`` fed by the other branch); ``D`` only on blocks; ``S`` needs two
        branches, never on both at once, and the other branch must really compute the module at that
        step (with ``separate`` calls the cond call runs first, so only ``uncond`` may share);
        decisions name only the model's modules; timesteps, when given, has one entry per step.
        """
        steps, layout = self.sampler.steps, self.sampler.cfg_layout
        if layout not in CFG_LAYOUTS:
            raise PlannerError(f"{json_path('sampler', 'cfg_layout')}: expected one of {', '.join(CFG_LAYOUTS)}, got {layout!r}")
        if self.sampler.timesteps and len(self.sampler.timesteps) != steps:
            raise PlannerError(
                f"{json_path('sampler', 'timesteps')}: expected {steps} timesteps (one per step), got {len(self.sampler.timesteps)}"
            )
        known = set(self.model.modules)
        if len(known) != len(self.model.modules):
            raise PlannerError(f"{json_path('model', 'modules')}: expected unique module names")
        want = set(self.branches)
        for module, per_branch in self.decisions.items():
            if module not in known:
                raise PlannerError(f"{json_path('decisions', module)}: module is not in model.modules of this plan")
            if set(per_branch) != want:
                raise PlannerError(
                    f"{json_path('decisions', module)}: expected branches {sorted(want)} for cfg_layout {layout!r}, got {sorted(per_branch)}"
                )
            kind, _ = module_kind(module)
            for b, codes in per_branch.items():
                where = json_path("decisions", module, b) if len(want) > 1 else json_path("decisions", module)
                if len(codes) != steps:
                    raise PlannerError(f"{where}: expected {steps} action codes (one per step), got {len(codes)}")
                bad = set(codes) - set(ACTION_CODES)
                if bad:
                    raise PlannerError(f"{where}: unknown action code(s) {''.join(sorted(bad))}; expected C, R, D, F or S")
                if codes[0] not in (COMPUTE, "S"):
                    raise PlannerError(f"{where}: step 0 must compute (C or S), got {codes[0]!r}: nothing is cached before the first step")
                if "D" in codes and kind != "block":
                    raise PlannerError(f"{where}: reuse_residual (D) applies to blocks only, not to a {kind} module")
                if "S" in codes and layout == CFG_NONE:
                    raise PlannerError(f"{where}: share_cfg (S) needs two CFG branches; cfg_layout is 'none'")
                if "S" in codes and layout == CFG_SEPARATE and b == "cond":
                    raise PlannerError(
                        f"{where}: with separate CFG calls the cond call runs first, so only uncond may share_cfg (S)"
                    )
        if layout != CFG_NONE:
            eff = None
            for module, per_branch in self.decisions.items():
                for b in BRANCHES:
                    other = BRANCHES[1 - BRANCHES.index(b)]
                    for k, c in enumerate(per_branch[b]):
                        if c != "S":
                            continue
                        eff = eff or self.effective_compute()
                        if not eff[module][other][k]:
                            raise PlannerError(
                                f"{json_path('decisions', module, b)}: share_cfg (S) at step {k} needs the {other} branch to compute the module there"
                            )
        return self

    def check_model(self, model: Any, *, strict: bool = True) -> None:
        """Raise PlannerError unless this plan fits ``model`` (a transformer, pipeline or Runner).

        Checks the class, the block count, that every module the plan names exists, and (when
        ``strict``) the fingerprint of config and block structure.
        """
        from planner.modules import cacheable_modules, model_fingerprint

        transformer = _transformer_of(model)
        cls = type(transformer).__name__
        if cls != self.model.cls:
            raise PlannerError(f"plan was made for a {self.model.cls}, not a {cls}")
        found = cacheable_modules(transformer)
        names = {m.name for m in found}
        n_blocks = sum(m.kind == "block" for m in found)
        plan_blocks = sum(module_kind(m)[0] == "block" for m in self.model.modules)
        if n_blocks != plan_blocks:
            raise PlannerError(f"plan was made for a model with {plan_blocks} blocks, this {cls} has {n_blocks}")
        missing = [m for m in self.decisions if m not in names]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise PlannerError(f"plan names module {missing[0]!r}{more}, which this {cls} does not have")
        if strict:
            fp = model_fingerprint(transformer)
            if fp != self.model.fingerprint:
                raise PlannerError(
                    f"plan was made for model fingerprint {self.model.fingerprint}, this {cls} has {fp} "
                    "(a different config or block structure)"
                )

    def check_steps(self, steps: int) -> None:
        """Raise PlannerError unless a run of ``steps`` sampling steps fits this plan."""
        if int(steps) != self.steps:
            raise PlannerError(f"plan was made for {self.steps} steps, the run has {steps}")

    def check_sampler(self, runner: Any, sampler: Any) -> None:
        """Raise PlannerError unless ``sampler`` on ``runner`` matches the plan's steps and CFG layout."""
        sampler = runner.resolve(sampler)
        self.check_steps(sampler.steps)
        layout = runner.cfg_layout(sampler)
        if layout != self.sampler.cfg_layout:
            raise PlannerError(
                f"plan was made for CFG layout {self.sampler.cfg_layout!r}, the run has {layout!r} (guidance {sampler.guidance})"
            )

    # ----------------------------------------------------------------- building
    @classmethod
    def for_model(
        cls,
        transformer: Any,
        *,
        steps: int,
        cfg_layout: str = CFG_NONE,
        decisions: Mapping[str, str | Mapping[str, str]] | None = None,
        scheduler: str = "default",
        scheduler_class: str | None = None,
        guidance: float = 1.0,
        timesteps: Iterable[float] | None = None,
        spec: str | None = None,
        prediction: Prediction | None = None,
        strategy: str = "manual",
        params: dict | None = None,
        profile_id: str | None = None,
        calib_seeds: Iterable[int] | None = None,
        device: str | None = None,
    ) -> "Plan":
        """A validated plan for ``transformer`` (or a pipeline/Runner holding one) from a decisions dict.

        ``decisions`` maps module names to a code string (all branches alike) or ``{branch: codes}``;
        modules left out compute at every step, and every module of the model gets an entry.
        Provenance gets the planner/torch/diffusers versions and the current UTC date.
        """
        from planner.modules import cacheable_modules, model_fingerprint

        t = _transformer_of(transformer)
        names = [m.name for m in cacheable_modules(t)]
        if device is None:
            try:
                device = str(next(t.parameters()).device)
            except StopIteration:
                device = None
        plan = cls(
            model=ModelRef(cls=type(t).__name__, fingerprint=model_fingerprint(t), modules=names, spec=spec),
            sampler=SamplerRef(
                scheduler=scheduler,
                steps=int(steps),
                guidance=float(guidance),
                cfg_layout=cfg_layout,
                timesteps=[_number(x) for x in (timesteps or [])],
                scheduler_class=scheduler_class,
            ),
            decisions={},
            prediction=prediction or Prediction(),
            provenance=Provenance(
                strategy=strategy,
                params=dict(params or {}),
                profile_id=profile_id,
                calib_seeds=[int(s) for s in (calib_seeds or [])],
                versions=_versions(),
                device=device,
                created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            ),
        )
        plan.decisions = normalize_decisions(decisions or {}, plan.branches, plan.steps, fill=names)
        return plan.validate()

    @classmethod
    def for_runner(
        cls,
        runner: Any,
        sampler: Any = None,
        decisions: Mapping[str, str | Mapping[str, str]] | None = None,
        **kwargs: Any,
    ) -> "Plan":
        """A validated plan for a Runner and Sampler (``None``: the family default); fills model, sampler
        (scheduler class and timesteps when the scheduler can say them) and provenance.

        Other keyword arguments go to :meth:`for_model` (``prediction``, ``strategy``, ``params``,
        ``profile_id``, ``calib_seeds``).
        """
        sampler = runner.resolve(sampler)
        scheduler_class, timesteps = None, []
        try:
            sched = runner._scheduler_for(sampler)
            scheduler_class = type(sched).__name__
            sched.set_timesteps(sampler.steps)
            timesteps = [float(x) for x in sched.timesteps]
        except Exception:  # e.g. Flux's dynamic shifting needs the image size: timesteps stay unknown
            timesteps = []
        return cls.for_model(
            runner.transformer,
            steps=sampler.steps,
            cfg_layout=runner.cfg_layout(sampler),
            decisions=decisions,
            scheduler=sampler.scheduler,
            scheduler_class=scheduler_class,
            guidance=sampler.guidance,
            timesteps=timesteps if len(timesteps) == sampler.steps else [],
            spec=runner.spec,
            device=kwargs.pop("device", str(runner.device)),
            **kwargs,
        )

    @classmethod
    def all_compute(cls, runner: Any, sampler: Any = None, **kwargs: Any) -> "Plan":
        """The plan that computes every module at every step (the identity plan) for a Runner."""
        return cls.for_runner(runner, sampler, {}, **kwargs)

    def with_decisions(self, decisions: Mapping[str, str | Mapping[str, str]], **changes: Any) -> "Plan":
        """A copy with ``decisions`` replacing (per module) this plan's; other fields may change via ``changes``."""
        merged = {m: dict(v) for m, v in self.decisions.items()}
        merged.update(normalize_decisions(decisions, self.branches, self.steps))
        return replace(self, decisions=merged, **changes).validate()

    # ----------------------------------------------------------------- (de)serialising
    def to_dict(self) -> dict:
        """The JSON document (branches that agree collapse to one string; modules in forward order)."""
        order = self._all_modules()
        decisions = {}
        for m in order:
            if m not in self.decisions:
                continue
            per_branch = self.decisions[m]
            values = list(per_branch.values())
            decisions[m] = values[0] if all(v == values[0] for v in values) else {b: per_branch[b] for b in self.branches}
        return {
            "schema": SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "model": {
                "class": self.model.cls,
                "fingerprint": self.model.fingerprint,
                "spec": self.model.spec,
                "modules": list(self.model.modules),
            },
            "sampler": {
                "scheduler": self.sampler.scheduler,
                "scheduler_class": self.sampler.scheduler_class,
                "steps": self.sampler.steps,
                "guidance": self.sampler.guidance,
                "cfg_layout": self.sampler.cfg_layout,
                "timesteps": [_number(x) for x in self.sampler.timesteps],
            },
            "decisions": decisions,
            "prediction": {
                "speedup": self.prediction.speedup,
                "latency_fraction": self.prediction.latency_fraction,
                "calib_error": self.prediction.calib_error,
                "metric": self.prediction.metric,
            },
            "provenance": {
                "strategy": self.provenance.strategy,
                "params": self.provenance.params,
                "profile_id": self.provenance.profile_id,
                "calib_seeds": list(self.provenance.calib_seeds),
                "versions": dict(self.provenance.versions),
                "device": self.provenance.device,
                "created": self.provenance.created,
            },
        }

    def to_json(self) -> str:
        """The plan as JSON text: indented, one line per module decision with the codes aligned in a column."""
        return _format(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, doc: Any, source: str = "plan") -> "Plan":
        """Build a plan from a parsed JSON document: version check, schema check, rule check (:meth:`validate`)."""
        if not isinstance(doc, dict):
            raise PlannerError(f"{source}: {json_path()}: expected a JSON object, got {_json_type(doc)}")
        doc = _check_version(doc, source)
        _schema_check(doc, source)
        try:
            layout = doc["sampler"]["cfg_layout"]
            steps = doc["sampler"]["steps"]
            branches = branches_of(layout)
            s, p, pv = doc["sampler"], doc.get("prediction", {}), doc.get("provenance", {})
            plan = cls(
                model=ModelRef(
                    cls=doc["model"]["class"],
                    fingerprint=doc["model"]["fingerprint"],
                    modules=list(doc["model"]["modules"]),
                    spec=doc["model"].get("spec"),
                ),
                sampler=SamplerRef(
                    scheduler=s["scheduler"],
                    steps=steps,
                    guidance=float(s["guidance"]),
                    cfg_layout=layout,
                    timesteps=list(s.get("timesteps", [])),
                    scheduler_class=s.get("scheduler_class"),
                ),
                decisions=normalize_decisions(doc["decisions"], branches, steps, strict_branches=True),
                prediction=Prediction(**{k: p.get(k) for k in ("speedup", "latency_fraction", "calib_error", "metric")}),
                provenance=Provenance(
                    strategy=pv.get("strategy", "manual"),
                    params=dict(pv.get("params", {})),
                    profile_id=pv.get("profile_id"),
                    calib_seeds=list(pv.get("calib_seeds", [])),
                    versions=dict(pv.get("versions", {})),
                    device=pv.get("device"),
                    created=pv.get("created"),
                ),
            )
            return plan.validate()
        except PlannerError as exc:
            raise PlannerError(f"{source}: {exc}") from None


def normalize_decisions(
    decisions: Mapping[str, Any],
    branches: tuple[str, ...],
    steps: int,
    *,
    fill: Iterable[str] | None = None,
    strict_branches: bool = False,
) -> dict[str, dict[str, str]]:
    """``{module: {branch: codes}}`` from strings (all branches alike) or per-branch dicts.

    Codes may be given as strings or sequences of codes/action names (``["C", "reuse", ...]``).
    ``fill`` lists modules to add as all-compute when absent. A per-branch dict without ``uncond``
    means uncond behaves like cond (unless ``strict_branches``; then a missing branch is left out
    and :meth:`Plan.validate` names it).
    """
    out: dict[str, dict[str, str]] = {}
    for module, value in decisions.items():
        if isinstance(value, Mapping):
            per = {b: _codes(v) for b, v in value.items()}
            if not strict_branches and "cond" in per:
                for b in branches:
                    per.setdefault(b, per["cond"])
            out[module] = per
        else:
            codes = _codes(value)
            out[module] = {b: codes for b in branches}
    for module in fill or ():
        out.setdefault(module, {b: COMPUTE * steps for b in branches})
    return out


def _codes(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "".join(CODE_OF.get(v, v) for v in value)


# --------------------------------------------------------------------- load / save
def loads_plan(text: str, source: str = "plan") -> Plan:
    """Parse and check plan JSON text; PlannerError (one line, naming ``source`` and the JSON path) if bad."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlannerError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    return Plan.from_dict(doc, source)


def load_plan(path: str | Path) -> Plan:
    """Load a plan file (JSON only, never pickle), checked against the schema and the plan rules."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlannerError(f"{path}: no such plan file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PlannerError(f"{path}: cannot read plan: {exc}") from None
    return loads_plan(text, str(path))


def save_plan(plan: Plan, path: str | Path) -> Path:
    """Validate ``plan`` and write it to ``path`` atomically (complete or absent, never half-written)."""
    from planner.io import write_text_atomic

    plan.validate()
    return write_text_atomic(path, plan.to_json())


@lru_cache(maxsize=1)
def plan_schema() -> dict:
    """The plan JSON Schema (``planner/schemas/plan.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def _parse_version(text: Any) -> tuple[int, int, int] | None:
    if not isinstance(text, str):
        return None
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else None  # type: ignore[return-value]


def _check_version(doc: dict, source: str) -> dict:
    name = doc.get("schema")
    if name != SCHEMA_NAME:
        raise PlannerError(f"{source}: {json_path('schema')}: expected {SCHEMA_NAME!r}, got {name!r} (not a cache plan?)")
    theirs, ours = _parse_version(doc.get("version")), _parse_version(SCHEMA_VERSION)
    if theirs is None:
        raise PlannerError(f"{source}: {json_path('version')}: expected a semantic version MAJOR.MINOR.PATCH, got {doc.get('version')!r}")
    if theirs[0] > ours[0]:
        raise PlannerError(
            f"{source}: plan format version {doc['version']} is newer than this planner reads ({ours[0]}.x); upgrade dit-cache-planner"
        )
    if theirs[0] < ours[0]:
        raise PlannerError(f"{source}: plan format version {doc['version']} is too old for this planner ({ours[0]}.x)")
    if theirs[1] > ours[1]:
        warnings.warn(
            f"{source}: plan format version {doc['version']} is newer than {SCHEMA_VERSION}; fields this planner does not know are ignored",
            stacklevel=3,
        )
        doc = _strip_unknown(doc, plan_schema(), plan_schema())
    return doc


def _strip_unknown(value: Any, schema: dict, root: dict) -> Any:
    """Drop object keys the schema does not know (for newer-minor files: additions are ignorable by semver)."""
    if "$ref" in schema:
        ref = schema["$ref"].split("/")[-1]
        schema = root["$defs"][ref]
    if isinstance(value, dict) and schema.get("additionalProperties") is False and "properties" in schema:
        return {k: _strip_unknown(v, schema["properties"][k], root) for k, v in value.items() if k in schema["properties"]}
    if isinstance(value, dict) and "properties" in schema:
        return {k: _strip_unknown(v, schema["properties"].get(k, {}), root) for k, v in value.items()}
    return value


def _schema_check(doc: dict, source: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(plan_schema())
    errors = list(validator.iter_errors(doc))
    if not errors:
        return
    err = jsonschema.exceptions.best_match(errors)
    where = json_path(*err.absolute_path)
    expected = err.schema.get("description") if isinstance(err.schema, dict) else None
    message = err.message if len(err.message) <= 160 else err.message[:157] + "..."
    if err.validator == "required":
        text = message
    elif err.validator == "additionalProperties":
        text = message
    elif expected:
        text = f"expected {expected}; {message}"
    else:
        text = message
    raise PlannerError(f"{source}: {where}: {text}".replace("\n", " "))


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _number(x: Any) -> float | int:
    x = float(x)
    return int(x) if x.is_integer() else x


def _versions() -> dict:
    import importlib.metadata as md

    import planner

    out = {"planner": planner.__version__}
    for pkg in ("torch", "diffusers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _transformer_of(obj: Any):
    """The transformer inside a Runner or pipeline, or ``obj`` itself."""
    if hasattr(obj, "pipe"):  # Runner
        obj = obj.pipe
    inner = getattr(obj, "transformer", None)
    if inner is not None and not isinstance(obj, type) and hasattr(inner, "named_modules"):
        return inner
    return obj


# --------------------------------------------------------------------- JSON layout
def _format(doc: dict) -> str:
    """Indented JSON where each decision sits on its own line, codes aligned, and number lists stay inline."""
    lines = ["{"]
    keys = list(doc)
    for i, key in enumerate(keys):
        comma = "," if i < len(keys) - 1 else ""
        if key == "decisions":
            lines.append(f'  "decisions": {_format_decisions(doc[key])}{comma}')
        else:
            lines.append(f"  {json.dumps(key)}: {_format_value(doc[key], 1)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def _format_value(value: Any, level: int) -> str:
    pad = "  " * (level + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{json.dumps(k)}: {_format_value(v, level + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * level + "}"
    if isinstance(value, list):
        if not value or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return json.dumps(value)
        items = [f"{pad}{_format_value(v, level + 1)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * level + "]"
    return json.dumps(value)


def _format_decisions(decisions: dict) -> str:
    if not decisions:
        return "{}"
    width = max(len(json.dumps(k)) for k in decisions) + 1
    lines = []
    for i, (k, v) in enumerate(decisions.items()):
        comma = "," if i < len(decisions) - 1 else ""
        key = (json.dumps(k) + ":").ljust(width + 1)
        val = json.dumps(v) if isinstance(v, str) else "{" + ", ".join(f"{json.dumps(b)}: {json.dumps(c)}" for b, c in v.items()) + "}"
        lines.append(f"    {key} {val}{comma}")
    return "{\n" + "\n".join(lines) + "\n  }"
