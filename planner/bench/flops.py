"""FLOPs of a sampling run as it actually ran, and the FLOP speedup of a method over full compute.

The counts are ``torch.utils.flop_counter``'s: every operator that runs while the counter is active
is looked up in its formula registry (matrix products, convolutions, attention) and its
floating-point operations added up; element-wise work (norms, activations, a cache's own
extrapolation) is not counted. Because it counts what ran, a run-time cache's skipped blocks count
as saved whatever the cache decided on these inputs, and a plan's reused modules likewise; the
ratio ``full FLOPs / method FLOPs`` is the FLOP speedup, the axis on which a method's saving shows
without the machine's overheads (on a large GPU model the closer guide to wall-clock speed).

``FlopCounterMode`` itself also tracks which module every operator ran in (forward hooks on every
module), which made a counted digits-dit run 5.6 times slower than a plain one on CPU; the bench
counts with :class:`OperatorFlops`, a dispatch mode that applies the same registry without the
module tracking (2.3 times a plain run, the same totals: ``tests/test_bench.py`` checks that they
agree).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OperatorFlops(TorchDispatchMode):
    """Adds up ``torch.utils.flop_counter``'s FLOP formulas over every operator run inside it (``total``)."""

    def __init__(self):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(run: Callable[[], Any], context: Callable[[], AbstractContextManager] | None = None,
                exact: bool = False) -> tuple[int, Any]:
    """Floating-point operations ``run()`` performs (inside ``context()`` when given; entering and leaving
    the context is not counted) and its output. ``exact``: count with ``FlopCounterMode`` itself
    (slower, the same total)."""
    with context() if context is not None else contextlib.nullcontext():
        if exact:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter:
                out = run()
            return int(counter.get_total_flops()), out
        counter = OperatorFlops()
        with counter:
            out = run()
        return int(counter.total), out


def flop_speedup(full_flops: int | None, method_flops: int | None) -> float | None:
    """``full_flops / method_flops``; ``None`` when either is unknown or the method ran no counted operation."""
    if not full_flops or not method_flops:
        return None
    return full_flops / method_flops
