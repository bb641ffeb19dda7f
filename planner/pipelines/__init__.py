"""Driving any diffusers DiT pipeline: its family (how to call it), its prompts, loading it.

* :func:`family_for` gives the :class:`~planner.runner.Family` of a pipeline object: class-conditional
  pipelines (:mod:`.classes`, and digits-dit's in :mod:`planner.zoo.digits`) or text pipelines
  (:mod:`.text`, one class driven by a table of facts per pipeline class);
* :mod:`.prompts`: prompt files and the shipped calibration and evaluation sets;
* :mod:`.encoding`: prompts encoded once by the pipeline's own ``encode_prompt``, cached on disk;
* :mod:`.probe`: a short run that measures how the CFG branches reach the transformer;
* :mod:`.loading`: a pipeline from a folder, the Hugging Face cache or ``module:function``.
"""

from __future__ import annotations

from planner.errors import PlannerError


def family_for(pipe):
    """The family that drives ``pipe`` (a diffusers pipeline object); PlannerError when there is none."""
    name = type(pipe).__name__
    if name == "DigitsDiTPipeline":
        from planner.zoo.digits import DigitsFamily

        return DigitsFamily()
    if name == "DiTPipeline":
        from planner.pipelines.classes import DiTFamily

        return DiTFamily()
    if getattr(pipe, "transformer", None) is None:
        raise PlannerError(f"{name} has no transformer: the planner caches a Diffusion Transformer's blocks")
    from planner.pipelines.text import text_family

    return text_family(pipe)

