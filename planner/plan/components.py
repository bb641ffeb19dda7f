"""Plans over pipelines that run more than one transformer (Wan 2.2: ``transformer``, then ``transformer_2``).

Such a plan still covers the whole run: one sampler, global step indices, one code string per module and
branch. Module names of the first transformer are written as they are (``blocks.0.attn1``), those of any
other transformer carry its pipeline component's name as a prefix (``transformer_2.blocks.0.attn1``), and
``model.components`` says, per component, its class, fingerprint and the global steps it runs. At a step
where a module's transformer does not run the module has no decision: its code there must be ``C``
(:func:`check_components`, part of :meth:`planner.plan.Plan.validate`). The transformer's whole output
(``Plan.output``) is each transformer's own too: a forecast never extrapolates through outputs of two
transformers (they are different networks), so the first step of each must compute. A plan without
components is a single-transformer plan whose modules run at every step, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from planner.artifact import json_path
from planner.errors import PlannerError

MAIN = "transformer"  # the component whose module names carry no prefix


@dataclass
class ComponentRef:
    """One transformer of a multi-transformer pipeline: class, fingerprint and the global steps it runs."""

    cls: str
    fingerprint: str
    steps: list[int] = field(default_factory=list)


def component_of(module: str, components: Mapping[str, Any] | None) -> str:
    """The pipeline component that ``module`` (a plan's module name) belongs to."""
    if components:
        head = module.split(".", 1)[0]
        if head != MAIN and head in components:
            return head
    return MAIN


def prefixed(component: str, name: str) -> str:
    """``name`` (a module path inside ``component``) as a plan names it."""
    return name if component == MAIN else f"{component}.{name}"


def module_steps(components: Mapping[str, Any] | None, module: str) -> list[int] | None:
    """The global steps ``module`` runs at, or ``None`` for every step (single-transformer plans).
    ``components`` maps a component to its :class:`ComponentRef` or to its list of steps."""
    if not components:
        return None
    ref = components.get(component_of(module, components))
    return None if ref is None else list(getattr(ref, "steps", ref))  # a ComponentRef, or its steps alone


def absent_steps(components: Mapping[str, Any] | None, modules, steps: int) -> dict[str, set[int]]:
    """``{module: steps it does not run at}`` for the modules whose transformer skips some steps."""
    out: dict[str, set[int]] = {}
    for m in modules:
        own = module_steps(components, m)
        if own is not None:
            missing = set(range(steps)) - set(own)
            if missing:
                out[m] = missing
    return out


def component_steps_of(components: Mapping[str, ComponentRef] | None) -> dict[str, list[int]] | None:
    """``{component: steps}``: the plain-data form a profile and a latency model keep."""
    return None if not components else {c: list(ref.steps) for c, ref in components.items()}


def compute_absent(decisions: Mapping[str, Mapping[str, str]], components: Mapping[str, Any] | None,
                   steps: int) -> dict[str, dict[str, str]]:
    """``decisions`` with ``C`` at every step a module's transformer does not run, and its first own step
    computing where it asked for a reuse (nothing is cached before it): what a strategy that proposes codes
    for every step gets when its plan is built (the search context does this)."""
    out = {m: dict(per) for m, per in decisions.items()}
    gone = absent_steps(components, out, steps)
    for m, missing in gone.items():
        own = sorted(set(range(steps)) - missing)
        for b, codes in out[m].items():
            chars = ["C" if k in missing else c for k, c in enumerate(codes)]
            if own and chars[own[0]] not in ("C", "S"):
                chars[own[0]] = "C"
            out[m][b] = "".join(chars)
    return out


def output_computing_first_steps(output: str | None, components: Mapping[str, Any] | None) -> str | None:
    """``output`` (a plan's output code string) with ``C`` at the first step of each transformer: what a
    strategy that proposes an output schedule over the whole run gets when its plan is built."""
    if output is None or not components:
        return output
    chars = list(output)
    for ref in components.values():
        own = list(getattr(ref, "steps", ref))
        if own:
            chars[own[0]] = "C"
    return "".join(chars)


def check_components(plan: Any) -> None:
    """The rules of ``model.components`` (PlannerError naming the JSON path); nothing without components.

    Each component runs a sorted list of distinct steps inside the plan's; every step is run by exactly one
    component; ``transformer`` is one of them; a module's codes are ``C``
    at the steps its transformer does not run, and at its transformer's first step ``C`` (or ``S``); the
    output's code is ``C`` at each transformer's first step."""
    comps = plan.model.components
    if not comps:
        return
    steps = plan.sampler.steps
    if MAIN not in comps:
        raise PlannerError(f"{json_path('model', 'components')}: expected a {MAIN!r} entry (the unprefixed modules)")
    owner: dict[int, str] = {}
    for name, ref in comps.items():
        where = json_path("model", "components", name, "steps")
        if ref.steps != sorted(set(ref.steps)) or any(not 0 <= k < steps for k in ref.steps):
            raise PlannerError(f"{where}: expected sorted distinct step indices from 0 to {steps - 1}, got {ref.steps}")
        for k in ref.steps:
            if k in owner:
                raise PlannerError(f"{where}: step {k} is also run by {owner[k]!r}; each step runs one transformer")
            owner[k] = name
    missing = [k for k in range(steps) if k not in owner]
    if missing:
        raise PlannerError(f"{json_path('model', 'components')}: no transformer runs step {missing[0]}")
    for name, ref in comps.items():
        if plan.output is not None and ref.steps and plan.output[ref.steps[0]] != "C":
            raise PlannerError(f"{json_path('output')}: step {ref.steps[0]} is the first step of {name!r} and must "
                               f"compute (C), got {plan.output[ref.steps[0]]!r}: nothing of it is kept before it")
    for module, per_branch in plan.decisions.items():
        own = module_steps(comps, module)
        first = own[0] if own else None
        for b, codes in per_branch.items():
            where = json_path("decisions", module, b) if len(per_branch) > 1 else json_path("decisions", module)
            for k, c in enumerate(codes):
                if k not in own and c != "C":
                    raise PlannerError(f"{where}: step {k} is run by {owner[k]!r}, not by this module's transformer "
                                       f"({component_of(module, comps)!r}): its code there must be C, got {c!r}")
            if first is not None and codes[first] not in ("C", "S"):
                raise PlannerError(f"{where}: step {first} is the first step of {component_of(module, comps)!r} and must "
                                   f"compute (C or S), got {codes[first]!r}: nothing is cached before it")


def check_component_models(plan: Any, transformer: Any, strict: bool) -> None:
    """PlannerError unless the transformers of ``transformer`` (a TransformerPair, or a single transformer)
    are the ones ``model.components`` lists: the same components and, with ``strict``, fingerprints."""
    from planner.modules import model_fingerprint

    comps = plan.model.components
    names = tuple(getattr(transformer, "component_names", ()) or (MAIN,))
    if not comps:
        if len(names) > 1:
            raise PlannerError(f"plan was made for one transformer, this pipeline runs {len(names)} ({', '.join(names)}): "
                               "make the plan on the pipeline itself")
        return
    if tuple(comps) != names:
        raise PlannerError(f"plan was made for transformers {', '.join(comps)}, this pipeline has {', '.join(names)}")
    for c, ref in comps.items():
        model = transformer.component(c) if len(names) > 1 else transformer
        cls = type(model).__name__
        if cls != ref.cls:
            raise PlannerError(f"plan was made for a {ref.cls} as {c}, not a {cls}")
        if strict and model_fingerprint(model) != ref.fingerprint:
            raise PlannerError(f"plan was made for {c} with fingerprint {ref.fingerprint}, this {cls} has "
                               f"{model_fingerprint(model)} (a different config or block structure)")
