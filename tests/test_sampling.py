"""Schedules (shift, Self-Forcing warped steps) and Euler/UniPC against diffusers' schedulers."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from streamgen.sampling.samplers import EulerSampler, UniPCSampler, cfg_combine, guided, make_sampler, sample
from streamgen.sampling.schedules import (
    FlowSchedule,
    default_denoising_steps,
    self_forcing_timesteps,
    shift_sigmas,
    shifted_timestep_table,
    warp_denoising_steps,
)


def test_shift_formula_and_fixed_points():
    s = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    out = shift_sigmas(s, 5.0)
    assert torch.allclose(out, 5 * s / (1 + 4 * s))
    assert out[0] == 0 and out[-1] == 1
    assert torch.equal(shift_sigmas(s, 1.0), s)
    with pytest.raises(ValueError, match="shift"):
        shift_sigmas(s, 0.0)


def test_self_forcing_warped_four_steps():
    # [1000, 750, 500, 250] through the shift-5 table: 1000 * 5s / (1 + 4s) at s = 1, .75, .5, .25
    ts = self_forcing_timesteps(4, 5.0)
    expected = torch.tensor([1000.0, 937.5, 2500.0 / 3.0, 625.0], dtype=torch.float64)
    assert torch.allclose(ts, expected, atol=1e-9)
    assert default_denoising_steps(4) == [1000, 750, 500, 250]
    assert torch.equal(self_forcing_timesteps(4, 5.0, warp=False), torch.tensor([1000.0, 750, 500, 250], dtype=torch.float64))


def test_warp_uses_self_forcing_table_indexing():
    # Self-Forcing: timesteps = cat(FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)
    #   .set_timesteps(1000).timesteps, [0]); step s -> timesteps[1000 - s]
    table = shifted_timestep_table(5.0)
    assert table.shape == (1000,)
    sig = torch.linspace(1.0, 0.0, 1001, dtype=torch.float64)[:-1]
    assert torch.allclose(table, 1000 * 5 * sig / (1 + 4 * sig))
    steps = [1000, 800, 600, 400, 200]  # a LongLive / Rolling-Forcing style list
    warped = warp_denoising_steps(steps, 5.0)
    assert torch.allclose(warped, table[[0, 200, 400, 600, 800]])
    assert (warped[:-1] > warped[1:]).all()
    with pytest.raises(ValueError, match="1..1000"):
        warp_denoising_steps([1000, 0])


def _toy_velocity(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=dtype) * 0.3

    def vel(x, t):
        s = (t.to(x.dtype) / 1000).view(-1, 1, 1)
        return torch.tanh(x @ A) * (1 + s) + 0.5 * x - 0.2

    return vel


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps,shift", [(4, 5.0), (12, 3.0), (30, 5.0)])
def test_unipc_matches_diffusers(order, steps, shift):
    vel = _toy_velocity()
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  solver_order=order)
    ref.set_timesteps(steps)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(vel(x, t.expand(2)), t, x).prev_sample
    schedule = FlowSchedule.unipc(steps, shift)
    assert torch.equal(schedule.timesteps.long(), ref.timesteps)
    assert torch.allclose(schedule.sigmas.float(), ref.sigmas, atol=1e-7)
    ours = sample(vel, noise.clone(), schedule, "unipc", order=order)
    # diffusers keeps sigmas in float32; we use them in float64
    assert torch.allclose(ours, x, atol=1e-6, rtol=1e-6), (ours - x).abs().max()


@pytest.mark.parametrize("steps,shift", [(4, 3.0), (20, 5.0)])
def test_euler_matches_diffusers(steps, shift):
    vel = _toy_velocity()
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    x = noise.clone()
    for t in ref.timesteps:
        x = ref.step(vel(x, t.expand(2)), t, x).prev_sample
    schedule = FlowSchedule.euler(steps, shift)
    assert torch.allclose(schedule.timesteps.float(), ref.timesteps, rtol=1e-6)
    ours = sample(vel, noise.clone(), schedule, "euler")
    assert torch.allclose(ours, x, atol=1e-6, rtol=1e-6)


def test_unipc_exact_on_straight_flow():
    # a constant-velocity (straight) flow x_t = (1-s) x0 + s n is integrated exactly by any solver
    x0 = torch.randn(3, 5, dtype=torch.float64)
    n = torch.randn(3, 5, dtype=torch.float64)

    def vel(x, t):
        return n - x0

    for name in ("euler", "unipc"):
        out = sample(vel, n.clone(), FlowSchedule.unipc(7, 5.0) if name == "unipc" else FlowSchedule.euler(7, 5.0), name)
        assert torch.allclose(out, x0, atol=1e-5), name


def test_cfg():
    c, u = torch.tensor([2.0]), torch.tensor([1.0])
    assert cfg_combine(c, u, 5.0).item() == 6.0
    calls = []

    def cond(x, t):
        calls.append("c")
        return x + 1

    def uncond(x, t):
        calls.append("u")
        return x

    assert guided(cond, uncond, 1.0) is cond
    fn = guided(cond, uncond, 3.0)
    assert torch.equal(fn(torch.zeros(1), torch.zeros(1)), torch.tensor([3.0]))
    assert calls == ["c", "u"]


def test_sampler_errors_name_allowed_values():
    sched = FlowSchedule.unipc(4)
    with pytest.raises(ValueError, match="euler, unipc"):
        make_sampler("ddim", sched)
    with pytest.raises(ValueError, match="order"):
        UniPCSampler(sched, order=4)
    assert isinstance(make_sampler("euler", sched), EulerSampler)
    s = UniPCSampler(sched)
    with pytest.raises(IndexError):
        s.step(4, torch.zeros(1), torch.zeros(1))


def test_renoise_loop_is_lightx2v_step_distill():
    """sampling.full.renoise_sample == LightX2V's WanStepDistillScheduler (4 steps [1000, 750, 500, 250],
    shift 5): x0 = x - sigma * flow, then (1 - sigma') * x0 + sigma' * fresh noise, the last x0 returned."""
    from streamgen.sampling.full import renoise_sample

    calls = []

    def flow(x, t):  # a fixed linear "model": flow = 0.3 x + 0.01 t
        calls.append(float(t[0]))
        return 0.3 * x + 0.01 * t.view(-1, 1, 1, 1, 1)

    noise = torch.randn(1, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    got = renoise_sample(flow, noise, steps=4, shift=5.0, generator=torch.Generator().manual_seed(1))
    # the reference, written out as LightX2V's scheduler does it
    table = 5 * torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1]
    table = table / (1 + 4 * torch.linspace(1, 0, 1001, dtype=torch.float64)[:-1])
    sig = [float(table[1000 - s]) for s in (1000, 750, 500, 250)]
    gen, x = torch.Generator().manual_seed(1), noise
    for i, s in enumerate(sig):
        x0 = x - s * (0.3 * x + 0.01 * s * 1000)
        x = x0 if i == 3 else (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(x.shape, generator=gen)
    assert calls == pytest.approx([s * 1000 for s in sig]) and calls[1] == pytest.approx(937.5)
    torch.testing.assert_close(got, x, rtol=1e-6, atol=1e-6)
