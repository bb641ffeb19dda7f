"""The cache plan: plain data saying, per module, step and CFG branch, compute or how to reuse.

A plan is keyed by module name like diffusers' ``_tp_plan``. Each module's decisions are one
string per CFG branch with one character per step, so a person reads them at a glance and a
``git diff`` of two plans shows exactly which steps changed::

    "transformer_blocks.3.attn1": "CCRCRCRCRC..."                       # both branches alike
    "transformer_blocks.7":       {"cond": "CCDDC...", "uncond": "CCSSC..."}

Modules a plan does not name are computed at every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_NAME = "dit-cache-plan"
SCHEMA_VERSION = "1.0.0"

# One character per action, in the plan file.
ACTION_CODES = {
    "C": "compute",  # run the module and refresh its cache
    "R": "reuse",  # last computed output (sub-layers: before gate/residual)
    "D": "reuse_residual",  # this step's input + last computed (output - input)
    "F": "forecast",  # first-order extrapolation from the last two computed outputs
    "S": "share_cfg",  # copy the other CFG branch's fresh output of this step
}
CODE_OF = {name: code for code, name in ACTION_CODES.items()}
COMPUTE = "C"
BRANCHES = ("cond", "uncond")


@dataclass
class ModelRef:
    """The model a plan was made for."""

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


@dataclass
class Prediction:
    """What the search predicted for the plan (``None`` where it did not say)."""

    speedup: float | None = None
    latency_fraction: float | None = None
    calib_error: float | None = None


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


@dataclass
class Plan:
    """A cache plan. ``decisions[module][branch]`` is a string of action codes, one per step."""

    model: ModelRef
    sampler: SamplerRef
    decisions: dict[str, dict[str, str]]
    prediction: Prediction = field(default_factory=Prediction)
    provenance: Provenance = field(default_factory=Provenance)

    @property
    def steps(self) -> int:
        return self.sampler.steps

    def code(self, module: str, step: int, branch: str = "cond") -> str:
        """The action code for ``module`` at ``step`` on ``branch`` (``C`` for modules not in the plan)."""
        per_branch = self.decisions.get(module)
        if per_branch is None:
            return COMPUTE
        return per_branch[branch][step]

    def action(self, module: str, step: int, branch: str = "cond") -> str:
        """Like :meth:`code`, as the action's full name (``compute``, ``reuse``, ...)."""
        return ACTION_CODES[self.code(module, step, branch)]
