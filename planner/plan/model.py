"""The cache plan as data: per module, step and CFG branch, compute or how to reuse.

A plan is keyed by module name like diffusers' ``_tp_plan``. Each module's decisions are one
string per CFG branch with one character per step, so a person reads them at a glance and a
``git diff`` of two plans shows exactly which steps changed::

    "transformer_blocks.3.attn1": "CCRCRCRCRC..."                       # both branches alike
    "transformer_blocks.7":       {"cond": "CCDDC...", "uncond": "CCSSC..."}

Modules a plan does not name are computed at every step. This module holds the data and the rules
a plan must keep (:meth:`Plan.validate`); building plans for a model is :mod:`planner.plan.build`,
files are :mod:`planner.plan.io`. It imports neither torch nor diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from planner.artifact import json_path
from planner.cfg import BRANCHES, CfgLayout, other_branch
from planner.errors import PlannerError
from planner.limits import MAX_STEPS
from planner.modules import module_kind
from planner.plan.components import absent_steps, check_component_models, check_components

# One character per action, in the plan file.
ACTION_CODES = {
    "C": "compute",  # run the module and refresh its cache
    "R": "reuse",  # last computed output (sub-layers: before gate/residual)
    "D": "reuse_residual",  # this step's input + last computed (output - input); blocks only
    "F": "forecast",  # first-order extrapolation in sampler time from the last two computed outputs
    "Q": "forecast2",  # second-order extrapolation in sampler time from the last three computed outputs
    "L": "forecast2_limited",  # forecast2 with its second-order term cut, per sample, to the first-order one's size
    "S": "share_cfg",  # copy the other CFG branch's fresh output of this step
}
CODE_OF = {name: code for code, name in ACTION_CODES.items()}
COMPUTE = "C"
REUSE_CODES = "RDFQLS"
# The order of each forecast action: how many computed outputs beyond one it extrapolates from.
FORECAST_ORDER = {"F": 1, "Q": 2, "L": 2}
# What the transformer's whole output can do at a step (Plan.output): run, or be reused or forecast.
OUTPUT_CODES = "CRFQL"


@dataclass
class ModelRef:
    """The model a plan was made for: transformer class, fingerprint, cacheable module names (forward order)."""

    cls: str
    fingerprint: str
    modules: list[str]
    spec: str | None = None
    # since 1.4.0: {pipeline component: ComponentRef} for pipelines with several transformers (None: one)
    components: dict[str, Any] | None = None


@dataclass
class SamplerRef:
    """The sampler a plan assumes: what :func:`planner.apply_plan` checks a run against.

    ``scheduler_config`` is a short hash of the scheduler's config (:func:`planner.plan.build.config_hash`);
    ``resolution`` (``[height, width]``) and ``frames`` are filled when known (``None`` otherwise), and so is
    ``input_shape``: the shape of one sample of the transformer's ``hidden_states`` (batch dimension left
    out), which is how a run through a bare pipeline call shows its resolution and frames to the executor."""

    scheduler: str
    steps: int
    guidance: float
    cfg_layout: CfgLayout
    timesteps: list[float] = field(default_factory=list)
    scheduler_class: str | None = None
    scheduler_config: str | None = None
    resolution: list[int] | None = None
    frames: int | None = None
    input_shape: list[int] | None = None


@dataclass
class Prediction:
    """What the search predicted for the plan (``None`` where it did not say); ``metric`` names ``calib_error``,
    ``costs`` what ``speedup`` is in (since 1.5.0): ``measured`` time on the profiling device, or ``flops``."""

    speedup: float | None = None
    latency_fraction: float | None = None
    calib_error: float | None = None
    metric: str | None = None
    costs: str | None = None


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
    model_revision: str | None = None  # since 1.2.0: the hub commit of the model
    dtype: str | None = None  # since 1.2.0: the transformer's dtype
    prompts: dict | None = None  # since 1.2.0: {"digest", "count", "keys"} of the calibration prompts


@dataclass
class Plan:
    """A cache plan. ``decisions[module][branch]`` is a string of action codes, one per step.

    In memory every named module has one string per branch of the plan's CFG layout; on disk
    branches that agree are written once.

    ``output`` (since 1.7.0), when set, is one code per step for the transformer's whole output: at a
    step whose code is not ``C`` the transformer does not run at all, and each CFG branch's output is
    reused (``R``) or forecast (``F``, ``Q``, ``L``) from that branch's last computed outputs (of the same
    transformer, where several run: each computes at its first step); the decisions then say what runs
    inside it at the other steps. ``None``: it runs at every step.
    """

    model: ModelRef
    sampler: SamplerRef
    decisions: dict[str, dict[str, str]]
    prediction: Prediction = field(default_factory=Prediction)
    provenance: Provenance = field(default_factory=Provenance)
    output: str | None = None

    # ----------------------------------------------------------------- reading
    @property
    def steps(self) -> int:
        return self.sampler.steps

    @property
    def layout(self) -> CfgLayout:
        return CfgLayout(self.sampler.cfg_layout)

    @property
    def branches(self) -> tuple[str, ...]:
        """The CFG branches this plan has decisions for."""
        return self.layout.branches

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

    def served_steps(self) -> set[int]:
        """The steps at which the transformer does not run: its output is served from its cache (``output``)."""
        return {k for k, c in enumerate(self.output or "") if c != COMPUTE}

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
        the plan's own module list. This is what really runs, the latency model's input; nothing runs at the
        steps whose transformer output is served (:meth:`served_steps`).
        """
        names = self._names(modules)
        mask = self.compute_mask()
        runs = [k not in self.served_steps() for k in range(self.steps)]
        out: dict[str, dict[str, list[bool]]] = {}
        for name in names:
            own = mask.get(name) or {b: [True] * self.steps for b in self.branches}
            _, parent = module_kind(name)
            above = mask[parent] if parent is not None and parent in mask else {b: runs for b in self.branches}
            out[name] = {b: [o and p and r for o, p, r in zip(own[b], above[b], runs)] for b in self.branches}
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
        gone = absent_steps(self.model.components, leaves, self.steps)  # two transformers: not its steps
        out = []
        for k in range(self.steps):
            here = [m for m in leaves if k not in gone.get(m, ())]
            out.append(sum(eff[m][b][k] for m in here for b in self.branches) / max(1, len(here) * len(self.branches)))
        return out

    def action_counts(self) -> dict[str, int]:
        """How many (module, branch, step) decisions use each action, by full action name."""
        counts = {name: 0 for name in ACTION_CODES.values()}
        gone = absent_steps(self.model.components, self._all_modules(), self.steps)
        for m in self._all_modules():
            for b in self.branches:
                for k, c in enumerate(self.codes(m, b)):
                    if k not in gone.get(m, ()):
                        counts[ACTION_CODES[c]] += 1
        return counts

    def _all_modules(self) -> list[str]:
        extra = [m for m in self.decisions if m not in set(self.model.modules)]
        return list(self.model.modules) + extra

    def _names(self, modules: Iterable[Any] | None) -> list[str]:
        if modules is None:
            return self._all_modules()
        return [m if isinstance(m, str) else m.name for m in modules]

    # ----------------------------------------------------------------- changing
    def with_decisions(self, decisions: Mapping[str, str | Mapping[str, str]], **changes: Any) -> "Plan":
        """A copy with ``decisions`` replacing (per module) this plan's; other fields may change via ``changes``."""
        merged = {m: dict(v) for m, v in self.decisions.items()}
        merged.update(normalize_decisions(decisions, self.branches, self.steps))
        return replace(self, decisions=merged, **changes).validate()

    # ----------------------------------------------------------------- checking
    def validate(self) -> "Plan":
        """Check the rules the schema cannot express; raise PlannerError naming the JSON path. Returns self.

        Rules: every code string has ``steps`` characters; branches match the CFG layout; step 0
        computes (``C``, or ``S`` fed by the other branch); ``D`` only on blocks; ``S`` needs two
        branches, never on both at once, and the other branch must really compute the module at that
        step (with ``separate`` calls the cond call runs first, so only ``uncond`` may share);
        decisions name only the model's modules; timesteps, when given, has one entry per step; ``output``,
        when given, has one code of :data:`OUTPUT_CODES` per step and computes at step 0.
        """
        steps, layout = self.sampler.steps, self.sampler.cfg_layout
        self._check_numbers()
        if layout not in CfgLayout.__members__.values():
            choices = ", ".join(CfgLayout)
            raise PlannerError(f"{json_path('sampler', 'cfg_layout')}: expected one of {choices}, got {layout!r}")
        layout = CfgLayout(layout)
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
                    f"{json_path('decisions', module)}: expected branches {sorted(want)} for cfg_layout {layout.value!r}, got {sorted(per_branch)}"
                )
            kind, _ = module_kind(module)
            for b, codes in per_branch.items():
                where = json_path("decisions", module, b) if len(want) > 1 else json_path("decisions", module)
                _check_codes(codes, steps, kind, layout, b, where)
        if self.output is not None:
            _check_output(self.output, steps)
        if layout is not CfgLayout.NONE:
            self._check_shared_sources()
        check_components(self)
        return self

    def _check_numbers(self) -> None:
        """Steps within bounds, and every number of the sampler and the prediction finite."""
        s, p = self.sampler, self.prediction
        if isinstance(s.steps, bool) or not isinstance(s.steps, int) or not 1 <= s.steps <= MAX_STEPS:
            raise PlannerError(f"{json_path('sampler', 'steps')}: expected an integer from 1 to {MAX_STEPS}, got {s.steps!r}")
        if not _finite(s.guidance):
            raise PlannerError(f"{json_path('sampler', 'guidance')}: expected a finite number, got {s.guidance!r}")
        for i, t in enumerate(s.timesteps):
            if not _finite(t):
                raise PlannerError(f"{json_path('sampler', 'timesteps', i)}: expected a finite number, got {t!r}")
        for key in ("speedup", "latency_fraction", "calib_error"):
            value = getattr(p, key)
            if value is not None and not _finite(value):
                raise PlannerError(f"{json_path('prediction', key)}: expected a finite number or null, got {value!r}")

    def _check_shared_sources(self) -> None:
        eff = None
        for module, per_branch in self.decisions.items():
            for b in BRANCHES:
                other = other_branch(b)
                for k, c in enumerate(per_branch[b]):
                    if c != "S":
                        continue
                    eff = eff or self.effective_compute()
                    if not eff[module][other][k]:
                        raise PlannerError(
                            f"{json_path('decisions', module, b)}: share_cfg (S) at step {k} needs the {other} branch to compute the module there"
                        )

    def check_model(self, model: Any, *, strict: bool = True) -> None:
        """Raise PlannerError unless this plan fits ``model`` (a transformer, pipeline or Runner).

        Checks the class, the block count, that every module the plan names exists, and (when
        ``strict``) the fingerprint of config and block structure.
        """
        from planner.modules import cacheable_modules, class_name, model_fingerprint, transformer_of

        transformer = transformer_of(model)
        check_component_models(self, transformer, strict)
        cls = class_name(transformer)
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
        size = getattr(runner, "output_size", None)
        if size is not None:
            self.check_size(size(sampler))

    def check_size(self, size: Mapping[str, int]) -> None:
        """Raise PlannerError unless a run of ``size`` (``height``, ``width``, ``num_frames``; missing: unknown)
        matches the resolution and frames the plan records (unknown on either side passes)."""
        res = self.sampler.resolution
        if res is not None and size.get("height") is not None and size.get("width") is not None:
            if [int(size["height"]), int(size["width"])] != list(res):
                raise PlannerError(f"plan was made for {res[0]}x{res[1]} (height x width), the run has "
                                   f"{size['height']}x{size['width']}: give --height {res[0]} --width {res[1]}")
        if self.sampler.frames is not None and size.get("num_frames") is not None:
            if int(size["num_frames"]) != self.sampler.frames:
                raise PlannerError(f"plan was made for {self.sampler.frames} frames, the run has {size['num_frames']}: "
                                   f"give --num-frames {self.sampler.frames}")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_codes(codes: str, steps: int, kind: str, layout: CfgLayout, branch: str, where: str) -> None:
    """The rules of one branch's code string (see :meth:`Plan.validate`)."""
    if len(codes) != steps:
        raise PlannerError(f"{where}: expected {steps} action codes (one per step), got {len(codes)}")
    bad = set(codes) - set(ACTION_CODES)
    if bad:
        raise PlannerError(f"{where}: unknown action code(s) {''.join(sorted(bad))}; expected C, R, D, F or S")
    if codes[0] not in (COMPUTE, "S"):
        raise PlannerError(f"{where}: step 0 must compute (C or S), got {codes[0]!r}: nothing is cached before the first step")
    if "D" in codes and kind != "block":
        raise PlannerError(f"{where}: reuse_residual (D) applies to blocks only, not to a {kind} module")
    if "S" in codes and layout is CfgLayout.NONE:
        raise PlannerError(f"{where}: share_cfg (S) needs two CFG branches; cfg_layout is 'none'")
    if "S" in codes and layout is CfgLayout.SEPARATE and branch == "cond":
        raise PlannerError(f"{where}: with separate CFG calls the cond call runs first, so only uncond may share_cfg (S)")


def _check_output(codes: Any, steps: int) -> None:
    """The rules of the transformer output's code string (see :meth:`Plan.validate`)."""
    where = json_path("output")
    if not isinstance(codes, str) or len(codes) != steps:
        raise PlannerError(f"{where}: expected a string of {steps} action codes (one per step)")
    bad = set(codes) - set(OUTPUT_CODES)
    if bad:
        raise PlannerError(f"{where}: unknown action code(s) {''.join(sorted(bad))}; the output takes {', '.join(OUTPUT_CODES)}")
    if codes[0] != COMPUTE:
        raise PlannerError(f"{where}: step 0 must compute (C), got {codes[0]!r}: nothing is cached before the first step")


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
