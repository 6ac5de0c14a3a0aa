"""Flow-matching noise schedules on Wan's 0..1000 timestep axis.

Conventions (rectified flow, as Wan / diffusers / Self-Forcing):
    x_t = (1 - sigma) * x0 + sigma * noise,   sigma = t / 1000 in [0, 1]
    the model predicts the flow  v = noise - x0,  so  x0 = x_t - sigma * v.

``shift`` warps a sigma grid towards high noise: ``sigma' = shift*s / (1 + (shift-1)*s)``
(Wan uses 5.0 for few-step / 720p, 3.0 for 480p with diffusers' UniPC).

Two families of schedules:
- ``self_forcing_timesteps``: the few-step list of distilled block-causal models
  (Self-Forcing / CausVid / LongLive). Self-Forcing builds a 1000-entry table
  ``T[i] = 1000 * shift(1 - i/1000)`` (``FlowMatchScheduler(shift, sigma_min=0,
  extra_one_step=True).set_timesteps(1000)``), appends 0, and with
  ``warp_denoising_step`` maps each listed step s to ``T[1000 - s]``:
  [1000, 750, 500, 250] -> [1000, 937.5, 833.33, 625] at shift 5.
- ``FlowSchedule.unipc`` / ``FlowSchedule.euler``: the many-step grids of diffusers'
  ``UniPCMultistepScheduler(use_flow_sigmas=True)`` and ``FlowMatchEulerDiscreteScheduler``
  for non-distilled (bidirectional) checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift*s / (1 + (shift-1)*s)``; identity for shift 1; keeps 0 and 1 fixed."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shifted_timestep_table(shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """Self-Forcing's training/inference table: ``num_train_timesteps`` timesteps from 1000 down, float64.

    Entry i is ``1000 * shift_sigmas(1 - i / num_train_timesteps)``, i = 0..num_train_timesteps-1.
    """
    s = torch.linspace(1.0, 0.0, num_train_timesteps + 1, dtype=torch.float64)[:-1]
    return shift_sigmas(s, shift) * NUM_TRAIN_TIMESTEPS


def default_denoising_steps(num_steps: int) -> list[int]:
    """Evenly spaced unwarped step list: 4 -> [1000, 750, 500, 250], 3 -> [1000, 667, 333]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [round(NUM_TRAIN_TIMESTEPS * (1 - i / num_steps)) for i in range(num_steps)]


def warp_denoising_steps(steps: list[int], shift: float = 5.0) -> torch.Tensor:
    """Map integer steps on 0..1000 through the shifted table (Self-Forcing ``warp_denoising_step``).

    Returns float64 timesteps; step s -> table[1000 - s] with table[1000] = 0.
    """
    table = torch.cat([shifted_timestep_table(shift), torch.zeros(1, dtype=torch.float64)])
    for s in steps:
        if not (0 < int(s) <= NUM_TRAIN_TIMESTEPS) or int(s) != s:
            raise ValueError(f"denoising steps must be integers in 1..1000, got {steps}")
    return table[[NUM_TRAIN_TIMESTEPS - int(s) for s in steps]]


def self_forcing_timesteps(
    num_steps: int = 4, shift: float = 5.0, *, steps: list[int] | None = None, warp: bool = True
) -> torch.Tensor:
    """Few-step timesteps (float64, descending, on 0..1000) for distilled block-causal models.

    ``steps`` overrides the evenly spaced list (e.g. LongLive/CausVid configs); ``warp=False``
    uses the listed steps as they are.
    """
    steps = list(steps) if steps is not None else default_denoising_steps(num_steps)
    if warp:
        return warp_denoising_steps(steps, shift)
    return torch.tensor(steps, dtype=torch.float64)


@dataclass(frozen=True)
class FlowSchedule:
    """A many-step grid: ``timesteps[i]`` is fed to the model, ``sigmas[i] -> sigmas[i+1]`` is step i.

    sigmas: (n + 1,) float64, descending, last entry 0.  timesteps: (n,) float64 on 0..1000.
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return self.timesteps.numel()

    @classmethod
    def unipc(cls, num_steps: int, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
        """The grid of diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=shift)``
        (== Wan's ``FlowUniPCMultistepScheduler``): sigmas ``linspace(1, 1/N, n+1)[:-1]`` shifted, the
        first nudged to 1 - 1e-6, timesteps ``int(sigma * N)`` (truncated, as diffusers casts to int64).
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        s = torch.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1, dtype=torch.float64)[:-1]
        s = shift_sigmas(s, shift).to(torch.float32)  # diffusers keeps these in float32
        if abs(float(s[0]) - 1.0) < 1e-6:
            s[0] -= 1e-6
        timesteps = (s.to(torch.float64) * num_train_timesteps).to(torch.float32).trunc()
        sigmas = torch.cat([s, s.new_zeros(1)]).to(torch.float64)
        return cls(sigmas=sigmas, timesteps=timesteps.to(torch.float64))

    @classmethod
    def euler(cls, num_steps: int, shift: float = 5.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> FlowSchedule:
        """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)``: sigmas
        ``shift(linspace(1, shift(1/N), n))`` (diffusers shifts the end point of its training
        table, then the inference grid again), 0 appended; timesteps ``sigma * N`` (not rounded)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        end = float(shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift))
        s = torch.linspace(1.0, end, num_steps, dtype=torch.float64)
        s = shift_sigmas(s, shift)
        return cls(sigmas=torch.cat([s, s.new_zeros(1)]), timesteps=s * num_train_timesteps)
