"""Classifier-free guidance as the transformer sees it: the layouts, their branches and calls per step.

A pipeline with CFG on evaluates the model twice per step, on the conditional and the
unconditional input. How those two *branches* reach the transformer is the *CFG layout*:

* ``none``: one branch (guidance off, or a guidance-distilled model), one call per step;
* ``cond_uncond``: one batched call, first half cond, second half uncond (DiT);
* ``uncond_cond``: one batched call, first half uncond, second half cond (PixArt, SD3);
* ``separate``: two calls per step, cond first, then uncond (Flux true CFG, Wan, Qwen-Image).

Plans, profiles, the executor and the strategies all speak of branches by the names in
:data:`BRANCHES`; this module is where those facts live.
"""

from __future__ import annotations

from enum import StrEnum

COND, UNCOND = "cond", "uncond"
BRANCHES = (COND, UNCOND)


class CfgLayout(StrEnum):
    """How the CFG branches reach the transformer (a ``str``: plan files store the value)."""

    NONE = "none"
    COND_UNCOND = "cond_uncond"
    UNCOND_COND = "uncond_cond"
    SEPARATE = "separate"

    def __repr__(self) -> str:
        return repr(self.value)  # messages quote a layout as the plan file writes it

    @property
    def branches(self) -> tuple[str, ...]:
        """The branches a run has: ``("cond",)`` without CFG, else ``("cond", "uncond")``."""
        return (COND,) if self is CfgLayout.NONE else BRANCHES

    @property
    def batched(self) -> bool:
        """Whether one call carries both branches as batch halves."""
        return self in (CfgLayout.COND_UNCOND, CfgLayout.UNCOND_COND)

    @property
    def calls_per_step(self) -> int:
        """Transformer calls per sampling step."""
        return 2 if self is CfgLayout.SEPARATE else 1

    @property
    def batch_order(self) -> tuple[str, ...]:
        """The branches along dim 0 of one call, in order (``separate``: one branch per call, named by the call)."""
        if self is CfgLayout.COND_UNCOND:
            return (COND, UNCOND)
        if self is CfgLayout.UNCOND_COND:
            return (UNCOND, COND)
        return (COND,)


CFG_LAYOUTS = tuple(layout.value for layout in CfgLayout)


# Names pipelines give their diffusers cache contexts, and the branch each one means.
CONTEXT_BRANCHES = {"cond": COND, "uncond": UNCOND, "pred_cond": COND, "pred_uncond": UNCOND}


def branch_of_context(name: str | None) -> str | None:
    """The CFG branch a diffusers cache-context name stands for (``None`` for other or no names)."""
    return CONTEXT_BRANCHES.get(name) if name is not None else None


def other_branch(branch: str) -> str:
    """The branch a ``share_cfg`` decision on ``branch`` copies from."""
    return UNCOND if branch == COND else COND


def cfg_halves(tensor, layout: CfgLayout) -> tuple:
    """``(cond, uncond)`` halves of a batched call's tensor along dim 0."""
    first, second = tensor.chunk(2)
    return (first, second) if CfgLayout(layout) is CfgLayout.COND_UNCOND else (second, first)


def guided(cond, uncond, scale: float):
    """The CFG combination a sampler uses: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)
