"""Small helpers on module outputs and call arguments: split/concatenate along the batch, slice call
arguments to one CFG half, and map a block's outputs back to the inputs they add a residual to.

A module output is a *tree*: a tensor, ``None``, or a tuple/list of trees (attention returns
``(hidden, encoder_hidden)``, SD3's last block returns ``(None, hidden)``). Anything else cannot be
cached, and says so.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from planner.errors import PlannerError

# These helpers run eagerly even inside a torch.compile'd transformer: they are the executor's
# bookkeeping (the module computations they feed are what gets compiled).
_eager = torch.compiler.disable

# Arguments whose leading dimension is a sequence or frequency axis, never the batch: slicing them
# when their length happens to equal the batch would be wrong.
ROTARY_ARG_NAMES = frozenset({"image_rotary_emb", "rotary_emb", "freqs_cis", "rotary_pos_emb", "pos_emb"})


@_eager
def tree_map(fn: Callable[..., torch.Tensor], *trees: Any) -> Any:
    """Apply ``fn`` to corresponding tensors of equally shaped trees; ``None`` leaves stay ``None``."""
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees))
    raise PlannerError(f"cannot cache a module output of type {type(first).__name__}")


def first_tensor(tree: Any) -> torch.Tensor | None:
    """The first tensor leaf of a tree (tuples, lists, dicts such as diffusers' ``BaseOutput``), or ``None``."""
    if isinstance(tree, torch.Tensor):
        return tree
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        for part in tree:
            t = first_tensor(part)
            if t is not None:
                return t
    return None


@_eager
def split(tree: Any, n: int) -> list[Any]:
    """``n`` equal batch slices (views) of every tensor in ``tree``, as ``n`` trees."""
    if n == 1:
        return [tree]
    lead = first_tensor(tree)
    if lead is None or lead.shape[0] % n:
        raise PlannerError(f"cannot split a module output of batch {None if lead is None else lead.shape[0]} into {n} CFG halves")
    size = lead.shape[0] // n
    return [tree_map(lambda t, i=i: t.narrow(0, i * size, size), tree) for i in range(n)]


@_eager
def cat(trees: list[Any]) -> Any:
    """Concatenate trees along the batch (inverse of :func:`split`)."""
    if len(trees) == 1:
        return trees[0]
    return tree_map(lambda *ts: torch.cat(ts, dim=0), *trees)


_POSITIONAL: dict[type, tuple[str, ...]] = {}  # a plain dict, not lru_cache: dynamo warns on lru_cache


def positional_names(cls: type) -> tuple[str, ...]:
    """Names of ``cls.forward``'s positional parameters (without ``self``)."""
    names = _POSITIONAL.get(cls)
    if names is None:
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = _POSITIONAL[cls] = tuple(p.name for p in params if p.kind in kinds)
    return names


def get_arg(cls: type, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of argument ``name`` in a call of ``cls.forward`` (``None`` when not passed)."""
    if name in kwargs:
        return kwargs[name]
    names = positional_names(cls)
    if name in names:
        i = names.index(name)
        if i < len(args):
            return args[i]
    return None


@_eager
def call_batch(cls: type, args: tuple, kwargs: dict) -> int:
    """The batch size of a call: dim 0 of ``hidden_states`` (or of the first tensor argument)."""
    hs = get_arg(cls, "hidden_states", args, kwargs)
    if not isinstance(hs, torch.Tensor):
        hs = first_tensor(list(args) + list(kwargs.values()))
    if hs is None or hs.dim() == 0:
        raise PlannerError(f"cannot find the batch of a {cls.__name__} call (no tensor argument)")
    return int(hs.shape[0])


def _slice_value(value: Any, name: str | None, lo: int, hi: int, full: int) -> Any:
    if name in ROTARY_ARG_NAMES:
        return value
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() > 0 and value.shape[0] == full else value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_value(v, name, lo, hi, full) for v in value)
    if isinstance(value, dict):
        return {k: _slice_value(v, k, lo, hi, full) for k, v in value.items()}
    return value


@_eager
def slice_call(cls: type, args: tuple, kwargs: dict, lo: int, hi: int, full: int) -> tuple[tuple, dict]:
    """The call's arguments restricted to batch rows ``[lo, hi)``: every tensor whose dim 0 is ``full``
    is sliced (inside tuples, lists and dicts too), except rotary-embedding arguments."""
    names = positional_names(cls)
    new_args = tuple(_slice_value(a, names[i] if i < len(names) else None, lo, hi, full) for i, a in enumerate(args))
    new_kwargs = {k: _slice_value(v, k, lo, hi, full) for k, v in kwargs.items()}
    return new_args, new_kwargs


# Blocks diffusers' TransformerBlockRegistry does not know (0.42), whose outputs are a tuple:
# (index of hidden_states, index of encoder_hidden_states) in what they return.
UNREGISTERED_BLOCKS = {
    "ChromaTransformerBlock": (1, 0),  # returns (encoder_hidden_states, hidden_states), as Flux's block
    "HunyuanVideo15TransformerBlock": (0, 1),  # returns (hidden_states, encoder_hidden_states)
}


class ResidualMap:
    """Where a block's outputs come from: output position -> input argument, for ``reuse_residual``.

    Uses diffusers' ``TransformerBlockRegistry`` metadata (``return_hidden_states_index``,
    ``return_encoder_hidden_states_index`` and the argument names), then :data:`UNREGISTERED_BLOCKS`;
    any other block class is assumed to return one tensor computed from ``hidden_states``.
    """

    def __init__(self, block_cls: type):
        from diffusers.hooks._helpers import TransformerBlockRegistry

        self.cls = block_cls
        try:
            md = TransformerBlockRegistry.get(block_cls)
            self.hs_index, self.ehs_index = md.return_hidden_states_index, md.return_encoder_hidden_states_index
            self.hs_name, self.ehs_name = md.hidden_states_argument_name, md.encoder_hidden_states_argument_name
            self.registered = True
        except ValueError:
            self.hs_index, self.ehs_index = UNREGISTERED_BLOCKS.get(block_cls.__name__, (0, None))
            self.hs_name, self.ehs_name = "hidden_states", "encoder_hidden_states"
            self.registered = block_cls.__name__ in UNREGISTERED_BLOCKS

    @_eager
    def inputs(self, args: tuple, kwargs: dict) -> dict[int, torch.Tensor | None]:
        """``{output position: the input tensor that position is a residual update of}``."""
        out = {self.hs_index: get_arg(self.cls, self.hs_name, args, kwargs)}
        if self.ehs_index is not None:
            out[self.ehs_index] = get_arg(self.cls, self.ehs_name, args, kwargs)
        return out

    @_eager
    def apply(self, out_cached: Any, in_cached: dict, in_now: dict) -> Any:
        """``in_now + (out_cached - in_cached)`` per output position; ``None`` outputs stay ``None``."""

        def one(pos: int, o: Any) -> Any:
            if o is None:
                return None
            if pos not in in_now or in_now[pos] is None or in_cached.get(pos) is None:
                raise PlannerError(
                    f"reuse_residual: output {pos} of {self.cls.__name__} has no matching input "
                    "(block not in diffusers' TransformerBlockRegistry?)"
                )
            return in_now[pos] + (o - in_cached[pos])

        if isinstance(out_cached, torch.Tensor):
            return one(self.hs_index if self.hs_index is not None else 0, out_cached)
        if isinstance(out_cached, (tuple, list)):
            return type(out_cached)(one(i, o) for i, o in enumerate(out_cached))
        raise PlannerError(f"cannot add a residual to an output of type {type(out_cached).__name__}")
