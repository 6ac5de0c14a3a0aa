"""Many-step flow-matching samplers (Euler, UniPC) with classifier-free guidance.

For non-distilled checkpoints (original Wan2.1, bidirectional or block-causal diffusion
without step distillation). Distilled few-step models use the re-noising loop in
``stream.py`` instead.

A sampler is a stepper over a ``FlowSchedule``: ``x = sampler.step(i, x, flow)`` moves the
sample from ``schedule.sigmas[i]`` to ``schedule.sigmas[i+1]`` given the model's flow
prediction at ``schedule.timesteps[i]``. Steppers hold only Python floats and the few
previous x0 predictions (UniPC), so they can run inside a chunk loop (one stepper per chunk,
``reset()`` between chunks). Step coefficients are computed on the host in float64 from the
schedule, never from device tensors (no host syncs).

Numerics follow diffusers' ``FlowMatchEulerDiscreteScheduler`` and
``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
solver_type="bh2", predict_x0=True, lower_order_final=True)`` (Wan's FlowUniPC).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from streamgen.sampling.schedules import FlowSchedule

# (x (B,C,F,H,W), t (B,) on 0..1000) -> flow prediction, same shape as x
VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SAMPLERS = ("euler", "unipc")


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def guided(cond_fn: VelocityFn, uncond_fn: VelocityFn | None, scale: float) -> VelocityFn:
    """A velocity function with CFG; ``scale == 1`` or no ``uncond_fn`` runs only the conditional pass."""
    if uncond_fn is None or scale == 1.0:
        return cond_fn

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return cfg_combine(cond_fn(x, t), uncond_fn(x, t), scale)

    return fn


class EulerSampler:
    """First-order flow-matching Euler: ``x <- x + (sigma_next - sigma) * flow``."""

    def __init__(self, schedule: FlowSchedule):
        self.schedule = schedule
        self._sigmas = [float(s) for s in schedule.sigmas]

    def reset(self) -> None:
        pass

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return x + (self._sigmas[i + 1] - self._sigmas[i]) * flow.to(x.dtype)


class UniPCSampler:
    """UniPC (B(h) = e^h - 1 "bh2", data prediction) predictor-corrector for flow models.

    With flow sigmas: alpha = 1 - sigma, lambda = log(alpha / sigma); the model's x0 is
    ``x - sigma * flow``. Step i: (1) if i > 0, correct the previous predictor's output with
    the new x0 (UniC, order of the previous predictor); (2) predict x at sigma[i+1] from the
    last ``order`` x0 predictions (UniP). Warm-up uses order min(order, i + 1); the final
    steps lower the order (``lower_order_final``), and the step to sigma = 0 returns x0.
    """

    def __init__(self, schedule: FlowSchedule, order: int = 2, *, lower_order_final: bool = True,
                 disable_corrector: tuple[int, ...] = ()):
        if order not in (1, 2, 3):
            raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
        self.schedule = schedule
        self.order = order
        self.lower_order_final = lower_order_final
        self.disable_corrector = tuple(disable_corrector)
        self._sigmas = [float(s) for s in schedule.sigmas]
        self.reset()

    def reset(self) -> None:
        self._x0s: list[torch.Tensor] = []  # most recent last
        self._steps: list[int] = []  # step index of each stored x0
        self._last_sample: torch.Tensor | None = None
        self._last_order = 0

    def _lambda(self, i: int) -> float:
        s = self._sigmas[i]
        return math.inf if s == 0.0 else math.log(1.0 - s) - math.log(s)

    def _coeffs(self, t_idx: int, s0_idx: int, prev_idx: list[int], corrector: bool):
        """rks, rhos and the scalars of the B(h) update from sigma[s0_idx] to sigma[t_idx].

        prev_idx: step indices of older x0 predictions (newest first), one per extra order.
        Returns (rks, rhos, h_phi_1, b_h): x_t = (sigma_t / sigma_s0) * x - alpha_t * h_phi_1 * m0
        - alpha_t * b_h * sum_k rho_k * D_k (see ``_update``). Host floats only.
        """
        lam_t, lam_s0 = self._lambda(t_idx), self._lambda(s0_idx)
        h = lam_t - lam_s0
        hh = -h
        h_phi_1 = math.expm1(hh)
        b_h = math.expm1(hh)
        order = len(prev_idx) + 1
        rks = [(self._lambda(j) - lam_s0) / h for j in prev_idx] + [1.0]
        R, b = [], []
        h_phi_k = h_phi_1 / hh - 1.0
        factorial = 1
        for k in range(1, order + 1):
            R.append([r ** (k - 1) for r in rks])
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / factorial
        if corrector:
            if order == 1:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
        else:
            if order == 1:
                rhos = []
            elif order == 2:
                rhos = [0.5]
            else:
                Rm = torch.tensor([row[:-1] for row in R[:-1]], dtype=torch.float64)
                rhos = torch.linalg.solve(Rm, torch.tensor(b[:-1], dtype=torch.float64)).tolist()
        return rks, rhos, h_phi_1, b_h

    def _update(self, x: torch.Tensor, t_idx: int, s0_idx: int, m0: torch.Tensor, older: list[tuple[int, torch.Tensor]],
                model_t: torch.Tensor | None) -> torch.Tensor:
        sigma_t, sigma_s0 = self._sigmas[t_idx], self._sigmas[s0_idx]
        alpha_t = 1.0 - sigma_t
        if sigma_t == 0.0:
            return m0.clone() if model_t is None else model_t.clone()
        rks, rhos, h_phi_1, b_h = self._coeffs(t_idx, s0_idx, [j for j, _ in older], corrector=model_t is not None)
        out = (sigma_t / sigma_s0) * x - (alpha_t * h_phi_1) * m0
        res = None
        for (j, mj), rk, rho in zip(older, rks, rhos):
            term = (rho / rk) * (mj - m0)  # rho * D1, D1 = (m_j - m0) / r_k
            res = term if res is None else res + term
        if model_t is not None:
            term = rhos[-1] * (model_t - m0)
            res = term if res is None else res + term
        if res is not None:
            out = out - (alpha_t * b_h) * res
        return out

    def step(self, i: int, x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        n = len(self._sigmas) - 1
        if not 0 <= i < n:
            raise IndexError(f"step {i} outside schedule of {n} steps")
        x0 = x - self._sigmas[i] * flow.to(x.dtype)
        # 1. corrector (UniC) on the previous predictor output, with the new x0
        if i > 0 and self._last_sample is not None and (i - 1) not in self.disable_corrector:
            order = self._last_order
            m0 = self._x0s[-1]
            older = list(zip(self._steps[-2::-1], self._x0s[-2::-1]))[: order - 1]
            x = self._update(self._last_sample, i, i - 1, m0, older, model_t=x0)
        self._x0s = (self._x0s + [x0])[-self.order:]
        self._steps = (self._steps + [i])[-self.order:]
        # 2. predictor (UniP) to sigma[i+1]
        order = self.order
        if self.lower_order_final:
            order = min(order, n - i)
        order = min(order, len(self._x0s))
        self._last_order = order
        self._last_sample = x
        m0 = self._x0s[-1]
        older = list(zip(self._steps[-2::-1], self._x0s[-2::-1]))[: order - 1]
        return self._update(x, i + 1, i, m0, older, model_t=None)


def make_sampler(name: str, schedule: FlowSchedule, **kwargs) -> EulerSampler | UniPCSampler:
    if name == "euler":
        return EulerSampler(schedule)
    if name == "unipc":
        return UniPCSampler(schedule, **kwargs)
    raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLERS)}")


def sample(velocity_fn: VelocityFn, noise: torch.Tensor, schedule: FlowSchedule, sampler: str = "unipc",
           **sampler_kwargs) -> torch.Tensor:
    """Integrate from pure noise (sigma = schedule.sigmas[0]) to x0.

    velocity_fn(x, t) gets t as a (B,) tensor of ``schedule.timesteps[i]`` on x's device.
    """
    stepper = make_sampler(sampler, schedule, **sampler_kwargs)
    x = noise
    batch = x.shape[0]
    ts = schedule.timesteps.to(device=x.device, dtype=torch.float32)
    for i in range(len(schedule)):
        t = ts[i].expand(batch)
        x = stepper.step(i, x, velocity_fn(x, t))
    return x
