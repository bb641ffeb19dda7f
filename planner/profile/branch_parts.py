"""Which parts of a module's output the CFG-branch comparison (the ``lag`` 0 rows) can compare.

Branches normally produce outputs of the same shapes, and the comparison takes the whole output.
Pipelines that run the branches as separate calls may feed them inputs of different shapes: Qwen-Image
encodes a prompt and its negative prompt to their own lengths, so a joint block's text stream has
1568 tokens in one branch and 1056 in the other while its image stream agrees. Then only the output
tensors whose shapes agree (by position in the output) are compared, and the profile records, per
module, which output tensors were left out; when none agree the module's ``lag`` 0 rows are NaN and
the record says they were not measured (:func:`planner.profile.artifact.load_profile` accepts NaN
there only for such modules).

Sharing a module's output across the branches (``share_cfg``, ``S``) needs the whole output to agree,
so :func:`shares_cfg` is false for every module with a record.

In ``meta.json`` (key ``cfg_comparison``, absent when every comparison was whole)::

    "cfg_comparison": {"transformer_blocks.0": {"outputs": 2, "left_out": [0], "measured": true},
                       "transformer_blocks.0.txt_mlp": {"outputs": 1, "left_out": [0], "measured": false}}

``outputs`` counts the module's output tensors, ``left_out`` lists the positions left out of the
comparison in at least one call (their shapes differed between the branches), ``measured`` whether
any part was compared at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

META_KEY = "cfg_comparison"


def agreeing_parts(a: Sequence[tuple[int, ...]], b: Sequence[tuple[int, ...]]) -> list[int]:
    """Positions of the output tensors whose shapes agree between two branches (``a``, ``b``: the
    shapes of each output tensor, in order). Outputs with different numbers of tensors agree nowhere:
    positions would not name the same stream."""
    if len(a) != len(b):
        return []
    return [i for i, (x, y) in enumerate(zip(a, b)) if tuple(x) == tuple(y)]


@dataclass
class PartialComparisons:
    """Per module name: how many output tensors it has, which were left out, whether any was compared."""

    records: dict[str, dict] = field(default_factory=dict)

    def note(self, module: str, outputs: int, compared: Sequence[int]) -> None:
        """Record one comparison of ``module`` that took only the tensors at positions ``compared``."""
        rec = self.records.setdefault(module, {"outputs": int(outputs), "left_out": [], "measured": False})
        rec["outputs"] = max(rec["outputs"], int(outputs))
        left = set(rec["left_out"]) | (set(range(outputs)) - set(compared))
        rec["left_out"] = sorted(left)
        rec["measured"] = rec["measured"] or bool(compared)

    def to_meta(self) -> dict:
        """The ``meta.json`` entries (empty when every comparison was whole)."""
        return {META_KEY: {k: dict(v) for k, v in sorted(self.records.items())}} if self.records else {}


def merge_records(parts: Sequence[Mapping | None]) -> dict:
    """One ``cfg_comparison`` record from several profiles' (shards of one profile): left-out
    positions unite, a module is measured when any shard measured it."""
    out: dict[str, dict] = {}
    for part in parts:
        for module, rec in (part or {}).items():
            mine = out.setdefault(module, {"outputs": int(rec["outputs"]), "left_out": [], "measured": False})
            mine["outputs"] = max(mine["outputs"], int(rec["outputs"]))
            mine["left_out"] = sorted(set(mine["left_out"]) | {int(i) for i in rec["left_out"]})
            mine["measured"] = bool(mine["measured"] or rec["measured"])
    return dict(sorted(out.items()))


def unmeasured_modules(extra: Mapping) -> set[str]:
    """Modules whose CFG comparison could not be measured at all (their ``lag`` 0 rows are NaN)."""
    return {m for m, rec in (extra.get(META_KEY) or {}).items() if not rec.get("measured", True)}


def shares_cfg(extra: Mapping, module: str) -> bool:
    """Whether the profile saw ``module``'s whole output agree in shape between the branches, so that
    one branch's output can stand in for the other's (``share_cfg``)."""
    return module not in (extra.get(META_KEY) or {})
