"""Whether one CFG branch's module output can stand in for the other's (``share_cfg``): shapes.

With separate CFG calls a pipeline may give the two branches inputs of different shapes: Qwen-Image
encodes a prompt and its negative prompt to their own lengths, so a joint block returns a text stream
of another length in each branch. Copying such an output into the other branch would hand the next
module a stream of the wrong length (a crash, or silently another text length), so ``share_cfg`` is
refused there with a :class:`~planner.errors.PlannerError`. The profile records the same fact
(:mod:`planner.profile.branch_parts`) and the greedy search does not offer ``S`` on such modules.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.errors import PlannerError


def tree_shapes(tree: Any) -> Any:
    """The shapes of every tensor in ``tree`` (tuples, lists, dicts), other leaves as ``None``."""
    if isinstance(tree, torch.Tensor):
        return tuple(tree.shape)
    if isinstance(tree, dict):
        return tuple((k, tree_shapes(v)) for k, v in tree.items())
    if isinstance(tree, (tuple, list)):
        return tuple(tree_shapes(v) for v in tree)
    return None


def call_shapes(args: tuple, kwargs: dict) -> Any:
    """The shapes of a call's tensor arguments, keyword arguments by name."""
    return tree_shapes(args), tree_shapes(dict(sorted(kwargs.items())))


def check_share(module: str, branch: str, other: str, step: int, mine: Any, theirs: Any, what: str) -> None:
    """PlannerError when ``mine`` and ``theirs`` (shapes of ``what``: the module's outputs, or the
    arguments of its call) differ, so that ``other``'s output cannot stand in for ``branch``'s."""
    if mine != theirs:
        raise PlannerError(
            f"{module}: share_cfg (S) at step {step} on the {branch} branch cannot take the {other} branch's output: "
            f"the two branches' {what} differ in shape (e.g. a prompt and a negative prompt encoded to different "
            "lengths); plan this module to compute there")
