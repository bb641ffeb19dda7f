"""Step-Wise Denoising Training (HarmoniCa's SDT) as two hooks on the transformer of a running pipeline.

One training round is one ordinary sampling run of the pipeline (``Runner.run``, so the sampler,
the CFG layout and the conditioning are exactly those the plan targets) from fresh noise, with the
router's gates applied through the executor (``apply_gates``) and :class:`StepwiseDistillation`
hooked on the transformer. At every transformer call of a step ``t > 0``:

* the pre-hook turns gradients on (the pipeline samples under ``no_grad``), so the gated forward,
  the *student*, builds a graph back to the gates;
* the post-hook calls the *teacher*: the same frozen transformer on the same arguments (the
  student's own x_t) through the class's ``forward``, which bypasses the executor's step tracker;
  outside a tracked call the executor's module hooks run their modules plainly, so the teacher
  neither reads nor writes any cache (``tests/test_harmonica.py`` checks this);
* loss_t = lambda_t * MSE(student, teacher) / E[teacher^2] + beta * sum_j w_j s_tj, one optimizer
  update per step (after the step's last call when CFG makes two calls), scores clamped;
* the post-hook returns the student's output *detached*: the pipeline's guidance and scheduler
  step then make the next x_t from the student's prediction, so training sees the cache states
  and inputs that earlier cached steps really produce (the point of SDT).

Step 0 always computes (its gates are fixed at 1): it fills the caches and trains nothing.

How the updated gates reach the running executor: the executor reads ``gates[step, j]`` at call
time from the tensor it was given. That tensor is :attr:`StepwiseDistillation.gates`, a leaf copy
of ``router.gates()`` refreshed in place after every update; the MSE's gradient with respect to it
is carried to the scores by the chain rule (``router.gates()`` backpropagated with that gradient).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Self

import torch

from planner.errors import PlannerError
from planner.executor.tree import first_tensor


def detached(output):
    """``output`` (a tensor, a tuple/list, or a diffusers ``BaseOutput``/dict) with every tensor detached."""
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, dict):  # BaseOutput is an OrderedDict with attributes
        return type(output)(**{k: detached(v) for k, v in output.items()})
    if isinstance(output, (tuple, list)):
        return type(output)(detached(v) for v in output)
    return output


@dataclass
class StepRecord:
    """What one denoising step of a round did: the loss parts (step 0: none) and, when recording, the x_t seen."""

    step: int
    mse: float | None = None
    penalty: float | None = None
    loss: float | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)  # x_t of each call (record=True only)


class StepwiseDistillation:
    """The SDT hooks for one round; a context manager that installs and removes them (module docstring).

    ``router``: the :class:`search._router.Router` being trained; ``optimizer`` holds its scores;
    ``lambdas``: ``[steps]`` IEPO weights; ``beta``: the penalty weight; ``weights``: per gated module
    (cost weights, mean 1); ``calls_per_step``: 2 for separate CFG calls, else 1; ``record``: keep each
    call's x_t (tests)."""

    def __init__(self, transformer: torch.nn.Module, router, optimizer: torch.optim.Optimizer, lambdas: torch.Tensor,
                 beta: float, weights: torch.Tensor, calls_per_step: int = 1, record: bool = False):
        self.transformer = transformer
        self.router = router
        self.optimizer = optimizer
        self.lambdas = lambdas
        self.beta = float(beta)
        self.weights = weights
        self.calls_per_step = int(calls_per_step)
        self.record = record
        self.gates = router.gates().detach().clone().requires_grad_(True)  # what the executor reads
        self.steps: list[StepRecord] = []
        self.calls = 0
        self._grad_mode: list[bool] = []
        self._mse = 0.0
        self._handles: list = []

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> Self:
        self._handles = [
            self.transformer.register_forward_pre_hook(self._before, with_kwargs=True),
            self.transformer.register_forward_hook(self._after, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        while self._grad_mode:  # a call that raised never reached its post-hook
            torch.set_grad_enabled(self._grad_mode.pop())

    @property
    def current_step(self) -> int:
        return self.calls // self.calls_per_step

    def check_complete(self, steps: int) -> None:
        """PlannerError unless the round made exactly ``steps`` steps of ``calls_per_step`` calls."""
        if self.calls != steps * self.calls_per_step:
            raise PlannerError(
                f"SDT expected {steps} steps of {self.calls_per_step} transformer call(s), saw {self.calls} calls "
                "(a sampler that calls the model more than once per step is not supported)"
            )

    # ------------------------------------------------------------------ the hooks
    def _before(self, module, args, kwargs):
        step = self.current_step
        if step >= self.router.steps:
            raise PlannerError(f"SDT: the pipeline runs more than the router's {self.router.steps} steps")
        if self.calls % self.calls_per_step == 0:
            self.steps.append(StepRecord(step))
        if self.record:
            from planner.executor.tree import get_arg

            x = get_arg(type(module), "hidden_states", args, kwargs)
            self.steps[-1].inputs.append((x if x is not None else first_tensor(args)).detach().clone())
        self._grad_mode.append(torch.is_grad_enabled())
        torch.set_grad_enabled(step > 0)  # step 0 computes everything: nothing to learn there

    def _after(self, module, args, kwargs, output):
        step = self.current_step
        try:
            if step > 0:
                self._learn(module, step, args, kwargs, output)
        finally:
            torch.set_grad_enabled(self._grad_mode.pop())
            self.calls += 1
        return detached(output)

    def _learn(self, module, step: int, args, kwargs, output) -> None:
        with torch.no_grad():  # the teacher: the frozen model on the student's x_t, past the executor
            teacher = first_tensor(type(module).forward(module, *args, **kwargs)).float()
        student = first_tensor(output).float()
        mse = torch.nn.functional.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
        mse = mse / self.calls_per_step
        if student.requires_grad:
            (self.lambdas[step] * mse).backward()  # -> self.gates.grad (accumulates over the step's calls)
        self._mse += float(mse.detach())
        if (self.calls + 1) % self.calls_per_step == 0:
            self._update(step)

    def _update(self, step: int) -> None:
        """One optimizer step from the step's MSE gradient (on the executor's gates) and the penalty."""
        gates = self.router.gates()
        penalty = (gates[step] * self.weights).sum()
        carried = self.gates.grad if self.gates.grad is not None else torch.zeros_like(self.gates)
        surrogate = (gates * carried).sum() + self.beta * penalty  # chain rule: d(loss)/d(scores)
        self.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
        self.optimizer.step()
        self.router.clamp_()
        with torch.no_grad():
            self.gates.copy_(self.router.gates())
        self.gates.grad = None
        lam = float(self.lambdas[step])
        record = self.steps[-1]
        record.mse, record.penalty = self._mse, float(penalty.detach())
        record.loss = lam * self._mse + self.beta * record.penalty
        self._mse = 0.0

    # ------------------------------------------------------------------ summary
    def summary(self) -> dict[str, float]:
        """Means over the round's trained steps: ``loss``, ``mse`` (relative), ``penalty``."""
        trained = [r for r in self.steps if r.loss is not None]
        if not trained:
            return {"loss": float("nan"), "mse": float("nan"), "penalty": float("nan")}
        n = len(trained)
        return {"loss": sum(r.loss for r in trained) / n, "mse": sum(r.mse for r in trained) / n,
                "penalty": sum(r.penalty for r in trained) / n}
