"""Token sampling for the similarity statistics: a fixed random subset of token positions.

At thousands of tokens per image or video, holding ``k`` lags of every module's output costs tens of
GB (see :mod:`planner.profile.estimate`). The similarity metrics are means over the features, so a
random subset of token positions estimates them well; the subset is drawn once per token count
from a seeded generator and is the same for every step, CFG branch, sample and module, so a lag
compares the same positions of two steps, and a residual is sampled at the same positions as the
output it belongs to.

Only outputs laid out ``[batch, tokens, channels]`` (every diffusers transformer block and its
attention and MLP sub-layers) are sampled, along axis 1; other shapes are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from planner.errors import PlannerError

TOKEN_AXIS = 1


@dataclass
class TokenSampler:
    """Keeps ``n`` of the ``T`` token positions (``T > n``) of every ``[batch, T, channels]`` tensor.

    The positions for a token count ``T`` are the first ``n`` of a permutation of ``range(T)``
    drawn from ``torch.Generator().manual_seed(seed + T)``, sorted; the same on every call.
    """

    n: int
    seed: int = 0
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise PlannerError(f"token sample must be a positive number of tokens, got {self.n!r}")

    def indices(self, tokens: int, device: torch.device | str) -> torch.Tensor | None:
        """The kept positions for ``tokens`` token positions (on ``device``), ``None`` when all are kept."""
        if tokens <= self.n:
            return None
        key = (tokens, str(device))
        idx = self._cache.get(key)
        if idx is None:
            gen = torch.Generator("cpu").manual_seed(int(self.seed) + int(tokens))
            idx = torch.randperm(tokens, generator=gen)[: self.n].sort().values.to(device)
            self._cache[key] = idx
        return idx

    def applies_to(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a ``[batch, tokens, channels]`` tensor with more tokens than are kept."""
        return t.dim() == 3 and t.shape[TOKEN_AXIS] > self.n

    def sample(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """``t`` reduced to the kept token positions (``t`` itself when it is not sampled)."""
        if t is None or not self.applies_to(t):
            return t
        return t.index_select(TOKEN_AXIS, self.indices(t.shape[TOKEN_AXIS], t.device))

    def to_dict(self) -> dict:
        return {"tokens": self.n, "seed": self.seed, "axis": TOKEN_AXIS,
                "rule": "first n of randperm(T) seeded with seed + T, sorted; [batch, tokens, channels] outputs only"}


def token_sampler(n: int | None, seed: int = 0) -> TokenSampler | None:
    """A :class:`TokenSampler` for ``n`` tokens, or ``None`` (exact statistics) when ``n`` is None."""
    return None if n is None else TokenSampler(n, seed)
