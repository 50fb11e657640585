"""Flow matching: the time convention (pinned against diffusers), the path, the Euler sampler on
velocity fields with known solutions, condition dropout and classifier-free guidance."""

import math

import pytest
import torch

from blip3o_mini.flow import (FlowMatching, cfg_combine, drop_condition, euler_sample, expand_t,
                              guided_velocity, interpolate, sample_t, shift_time, sigma_to_t,
                              t_to_sigma, time_grid, velocity_target, velocity_to_diffusers)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed))


# ---------------------------------------------------------------- path and time convention
def test_path_endpoints_and_velocity():
    x_0, x_1 = rand(3, 64, 8, seed=0), rand(3, 64, 8, seed=1)
    assert torch.equal(interpolate(x_0, x_1, torch.zeros(3)), x_0)  # t = 0 is noise
    assert torch.equal(interpolate(x_0, x_1, torch.ones(3)), x_1)  # t = 1 is data
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = interpolate(x_0, x_1, t)
    assert torch.allclose(x_t[1], 0.5 * (x_0[1] + x_1[1]))
    # the velocity is the time derivative of the path (finite difference, per sample t)
    h = 1e-3
    fd = (interpolate(x_0, x_1, t + h) - interpolate(x_0, x_1, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x_0, x_1), atol=1e-3)
    assert expand_t(t, x_t).shape == (3, 1, 1)


def test_time_convention_matches_diffusers_sigma():
    """Our x_t at t equals diffusers' FlowMatchEulerDiscreteScheduler.scale_noise at sigma = 1 - t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    data, noise = rand(4, 64, 8, seed=2), rand(4, 64, 8, seed=3)
    idx = torch.tensor([0, 250, 600, 999])
    timesteps, sigmas = sched.timesteps[idx], sched.sigmas[idx]
    theirs = sched.scale_noise(data, timesteps, noise)
    ours = interpolate(noise, data, sigma_to_t(sigmas))
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert sigmas[0] == 1.0  # diffusers starts from noise at sigma 1 = our t 0
    assert t_to_sigma(0.25) == 0.75 and sigma_to_t(t_to_sigma(0.3)) == pytest.approx(0.3)


def test_euler_matches_diffusers_scheduler():
    """The same sampler as diffusers' Euler flow scheduler, once velocity and time are mapped."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    num_steps = 7
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(sigmas=t_to_sigma(time_grid(num_steps))[:-1].tolist())
    field = lambda x, t: torch.sin(3 * x) + expand_t(t, x) ** 2  # noqa: E731  (nonlinear in x and t)
    x_0 = rand(2, 16, 4, seed=4)
    x = x_0.clone()
    for timestep in sched.timesteps:
        t = sigma_to_t(timestep / 1000).expand(x.shape[0])
        x = sched.step(velocity_to_diffusers(field(x, t)), timestep, x).prev_sample
    ours = euler_sample(field, x_0, num_steps).x_1
    assert torch.allclose(ours, x, atol=1e-5)


def test_time_shift_matches_diffusers_and_moves_time_toward_noise():
    """Our shifted grid is diffusers' `shift` (SD3) in our time; shift 1 changes nothing."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=t_to_sigma(time_grid(10))[:-1].tolist())  # diffusers shifts them
    torch.testing.assert_close(sigma_to_t(sched.sigmas), time_grid(10, shift=3.0))
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t) and torch.equal(time_grid(10, shift=1.0), time_grid(10))
    shifted = time_grid(10, shift=3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all()  # still 0 -> 1, increasing
    assert (shifted[1:-1] < t[1:-1]).all()  # every inner time noisier
    with pytest.raises(ValueError, match="time shift must be > 0"):
        shift_time(t, 0.0)


def test_time_shift_applies_to_training_times_and_sampling():
    fm = FlowMatching(cond_drop_prob=0.0, time_shift=3.0, num_steps=4, guidance_scale=1.0)
    seen = []

    def model(x_t, t, cond, cond_mask):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    out = fm.loss(model, rand(20_000, 1, 1, seed=20), rand(20_000, 1, 1, seed=21), generator=gen(22))
    assert abs(out.t.median() - shift_time(torch.tensor(0.5), 3.0)) < 0.02  # median 0.25, not 0.5
    seen.clear()
    fm.sample(model, rand(2, 1, 1, seed=23), (4, 2))
    torch.testing.assert_close(torch.stack([s[0] for s in seen]), time_grid(4, shift=3.0)[:-1])
    with pytest.raises(ValueError, match="time_shift"):
        FlowMatching(time_shift=-1.0)


def test_sample_t_range_and_methods():
    for method in ("uniform", "logit_normal"):
        t = sample_t(10_000, method=method, generator=gen())
        assert t.shape == (10_000,) and 0 <= t.min() and t.max() < 1
    assert abs(sample_t(10_000, generator=gen()).mean() - 0.5) < 0.02
    with pytest.raises(ValueError, match="time sampling"):
        sample_t(4, method="cosine")


# ---------------------------------------------------------------- sampler accuracy
def test_euler_exact_on_straight_paths():
    """Data = one point mu: the true marginal field is (mu - x) / (1 - t); every trajectory is a
    straight line, so even 3 Euler steps land exactly on mu."""
    mu = rand(1, 64, 8, seed=5)
    field = lambda x, t: (mu - x) / (1 - expand_t(t, x))  # noqa: E731
    res = euler_sample(field, rand(5, 64, 8, seed=6), num_steps=3, return_trajectory=True)
    assert torch.allclose(res.x_1, mu.expand(5, -1, -1), atol=1e-5)
    assert res.trajectory.shape == (4, 5, 64, 8) and torch.equal(res.t, time_grid(3))
    # the trajectory lies on the straight line x_t = t mu + (1 - t) x_0
    x_0 = res.trajectory[0]
    for k, t in enumerate(res.t):
        assert torch.allclose(res.trajectory[k], t * mu + (1 - t) * x_0, atol=1e-5)


def test_euler_from_a_start_time_finishes_a_noised_sample():
    """SDEdit: x at time 0.6 on the straight path to mu, integrated over [0.6, 1], lands on mu;
    the grid covers [start, 1] only."""
    mu, x_0 = rand(1, 16, 4, seed=9), rand(3, 16, 4, seed=10)
    field = lambda x, t: (mu - x) / (1 - expand_t(t, x))  # noqa: E731
    res = euler_sample(field, 0.6 * mu + 0.4 * x_0, num_steps=2, start=0.6)
    torch.testing.assert_close(res.t, torch.tensor([0.6, 0.8, 1.0]))
    torch.testing.assert_close(res.x_1, mu.expand(3, -1, -1), atol=1e-5, rtol=0)
    c = rand(1, 4, seed=11)  # a constant field moves x by (1 - start) * c
    torch.testing.assert_close(euler_sample(lambda x, t: c.expand_as(x), x_0[:, 0], 3, start=0.25).x_1,
                               x_0[:, 0] + 0.75 * c)
    with pytest.raises(ValueError, match="start must be in"):
        euler_sample(field, x_0, 2, start=1.0)


def test_sample_from_a_start_time_keeps_the_step_size():
    """FlowMatching.sample(start=t0) spends round(num_steps * (1 - t0)) steps on [t0, 1], the
    full path's step size, unless num_steps is given."""
    fm = FlowMatching(cond_drop_prob=0.0, num_steps=30, guidance_scale=1.0)
    seen = []

    def model(x_t, t, cond, cond_mask):
        seen.append(float(t[0]))
        return torch.zeros_like(x_t)

    cond, x = rand(2, 1, 1, seed=24), rand(2, 4, 2, seed=25)
    fm.sample(model, cond, (4, 2), x_0=x, start=0.5)
    assert len(seen) == 15 and seen[0] == 0.5
    seen.clear()
    fm.sample(model, cond, (4, 2), x_0=x, start=0.99)
    assert len(seen) == 1  # never zero steps
    seen.clear()
    fm.sample(model, cond, (4, 2), x_0=x, start=0.5, num_steps=4)
    assert len(seen) == 4


def gaussian_data_field(m: float, s: float):
    """The true velocity when the data are N(m, s^2) in every coordinate: x_t is Gaussian too
    (mean t m, variance t^2 s^2 + (1 - t)^2), E[x_1 | x_t] is linear in x_t, and
    v = (E[x_1 | x_t] - x_t) / (1 - t)."""
    def field(x, t):
        t = expand_t(t, x)
        x1_hat = m + t * s**2 * (x - t * m) / (t**2 * s**2 + (1 - t) ** 2)
        return (x1_hat - x) / (1 - t)
    return field


@pytest.mark.parametrize("eta", [0.0, 0.5, 2.0])
def test_sde_sampler_keeps_the_marginals_of_the_true_field(eta):
    """With the true field, noise along the path (any eta) still ends at the data distribution:
    the added drift is exactly what the injected noise spreads, so a sign or scale slip in
    either would move the final mean or std."""
    m, s = 2.0, 0.5
    x_1 = euler_sample(gaussian_data_field(m, s), rand(40000, 1, seed=7), num_steps=200,
                       sde_noise=eta, generator=gen(8)).x_1
    assert abs(x_1.mean().item() - m) < 0.02
    assert abs(x_1.std().item() - s) < 0.02


def test_sde_sampler_noise_is_seeded_and_zero_noise_is_the_ode():
    field = gaussian_data_field(1.0, 0.3)
    x_0 = rand(4, 8, 2, seed=9)
    a = euler_sample(field, x_0, 10, sde_noise=1.0, generator=gen(1)).x_1
    assert torch.equal(a, euler_sample(field, x_0, 10, sde_noise=1.0, generator=gen(1)).x_1)
    assert not torch.allclose(a, euler_sample(field, x_0, 10, sde_noise=1.0, generator=gen(2)).x_1)
    assert torch.equal(euler_sample(field, x_0, 10, sde_noise=0.0, generator=gen(1)).x_1,
                       euler_sample(field, x_0, 10).x_1)
    with pytest.raises(ValueError, match="sde_noise"):
        euler_sample(field, x_0, 10, sde_noise=-1.0)
    with pytest.raises(ValueError, match="sde_noise"):
        FlowMatching(sde_noise=-0.5)


def test_euler_constant_field_exact_and_linear_field_first_order():
    x_0 = rand(4, 10, seed=7)
    c = rand(1, 10, seed=8)
    assert torch.allclose(euler_sample(lambda x, t: c.expand_as(x), x_0, 1).x_1, x_0 + c, atol=1e-6)
    # dx/dt = a x  ->  x(1) = x_0 e^a; Euler gives (1 + a/K)^K, error O(1/K)
    a = -1.5
    errors = []
    for k in (10, 20, 40):
        x_1 = euler_sample(lambda x, t: a * x, x_0, k).x_1
        assert torch.allclose(x_1, x_0 * (1 + a / k) ** k, rtol=1e-4)
        errors.append((x_1 - x_0 * math.exp(a)).abs().max().item())
    assert errors[0] / errors[1] == pytest.approx(2, rel=0.15)  # halving dt halves the error
    assert errors[1] / errors[2] == pytest.approx(2, rel=0.15)


# ---------------------------------------------------------------- classifier-free guidance
def test_condition_dropout_rate_and_zeros():
    cond = torch.ones(20_000, 2, 3)
    dropped_cond, dropped = drop_condition(cond, 0.1, gen(0))
    assert abs(dropped.float().mean().item() - 0.1) < 0.01  # ~10%, 4.7 sigma band
    assert torch.all(dropped_cond[dropped] == 0) and torch.all(dropped_cond[~dropped] == 1)
    # seeded: same generator, same rows
    assert torch.equal(drop_condition(cond, 0.1, gen(0))[1], dropped)
    assert not drop_condition(cond, 0.0, gen(1))[1].any()
    with pytest.raises(ValueError, match="probability"):
        drop_condition(cond, 1.5)


def test_cfg_combination_formula():
    v_c, v_u = rand(2, 4, seed=9), rand(2, 4, seed=10)
    assert torch.allclose(cfg_combine(v_c, v_u, 1.0), v_c)
    assert torch.allclose(cfg_combine(v_c, v_u, 0.0), v_u)
    assert torch.allclose(cfg_combine(v_c, v_u, 3.0), 3 * v_c - 2 * v_u)


def test_guided_velocity_uses_zeros_as_null_condition():
    calls = []

    def model(x_t, t, cond, cond_mask):  # velocity = mean of the condition, broadcast
        calls.append(cond.shape[0])
        return x_t * 0 + cond.mean(dim=(1, 2))[:, None, None] + 1.0

    cond = torch.full((3, 5, 2), 2.0)
    x = rand(3, 4, 6, seed=11)
    v = guided_velocity(model, 3.0)(x, torch.zeros(3), cond, None)
    # v_cond = 3, v_uncond (zeros condition) = 1 -> 1 + 3 * (3 - 1) = 7
    assert torch.allclose(v, torch.full_like(x, 7.0)) and calls == [6]  # one batch of 2B
    assert guided_velocity(model, 1.0) is model


def test_guidance_interval_guides_only_inside_it():
    def model(x_t, t, cond, cond_mask):  # v_cond = 3, v_uncond (zeros condition) = 1
        return x_t * 0 + cond.mean(dim=(1, 2))[:, None, None] + 1.0

    cond, x = torch.full((3, 5, 2), 2.0), rand(3, 4, 6, seed=11)
    v = guided_velocity(model, 3.0, (0.2, 0.8))
    for t, expected in ((0.1, 3.0), (0.2, 7.0), (0.5, 7.0), (0.8, 7.0), (0.9, 3.0)):
        assert torch.allclose(v(x, torch.full((3,), t), cond, None), torch.full_like(x, expected)), t
    # the sampler integrates the conditional field before 0.5 and the guided one after
    flow = FlowMatching(guidance_scale=3.0, guidance_interval=[0.5, 1.0])  # a YAML list
    assert flow.guidance_interval == (0.5, 1.0)
    x_1 = flow.sample(model, cond, (4, 6), x_0=torch.zeros(3, 4, 6), num_steps=10).x_1
    assert torch.allclose(x_1, torch.full_like(x_1, 0.5 * 3.0 + 0.5 * 7.0))
    everywhere = flow.sample(model, cond, (4, 6), x_0=torch.zeros(3, 4, 6), num_steps=10,
                             guidance_interval=(0.0, 1.0)).x_1
    assert torch.allclose(everywhere, torch.full_like(x_1, 7.0))
    for bad in ([0.5], [0.8, 0.2], [-0.1, 1.0]):
        with pytest.raises(ValueError, match=r"guidance_interval must be \[lo, hi\] with 0 <= lo <= hi <= 1"):
            FlowMatching(guidance_interval=bad)


# ---------------------------------------------------------------- the recipe
def test_flow_matching_loss_is_mse_to_velocity():
    fm = FlowMatching(cond_drop_prob=0.0)
    x_1, cond = rand(4, 64, 8, seed=12), rand(4, 3, 5, seed=13)
    x_0, t = rand(4, 64, 8, seed=14), torch.rand(4, generator=gen(15))

    def model(x_t, t, cond, cond_mask):
        return 0.5 * x_t

    out = fm.loss(model, x_1, cond, x_0=x_0, t=t)
    expected = ((0.5 * interpolate(x_0, x_1, t) - (x_1 - x_0)) ** 2).mean()
    assert torch.allclose(out.loss, expected)
    assert out.v_pred.shape == out.v_target.shape == x_1.shape and not out.dropped.any()
    # a perfect velocity model has zero loss
    perfect = fm.loss(lambda *_: x_1 - x_0, x_1, cond, x_0=x_0, t=t)
    assert perfect.loss.item() == 0.0


def test_noise_repeats_reuse_each_condition_for_several_noisy_copies():
    """noise_repeats r: row i of (x_1, cond) becomes rows i*r .. i*r+r-1, each with its own
    (x_0, t); the loss is the plain loss of those repeated rows."""
    fm, plain = FlowMatching(cond_drop_prob=0.0, noise_repeats=3), FlowMatching(cond_drop_prob=0.0)
    x_1, cond = rand(2, 64, 8, seed=19), rand(2, 3, 5, seed=20)
    x_0, t = rand(6, 64, 8, seed=21), torch.rand(6, generator=gen(22))
    seen = {}

    def model(x_t, t, cond, cond_mask):
        seen["cond"] = cond
        return 0.5 * x_t

    out = fm.loss(model, x_1, cond, x_0=x_0, t=t)
    assert torch.equal(seen["cond"], cond[[0, 0, 0, 1, 1, 1]])
    assert torch.equal(out.v_target, x_1[[0, 0, 0, 1, 1, 1]] - x_0)
    ref = plain.loss(model, x_1.repeat_interleave(3, 0), cond.repeat_interleave(3, 0), x_0=x_0, t=t)
    assert torch.allclose(out.loss, ref.loss)
    drawn = fm.loss(model, x_1, cond, generator=gen(23))  # sampled: six different times
    assert drawn.t.shape == (6,) and drawn.t.unique().numel() == 6
    with pytest.raises(ValueError, match="noise_repeats"):
        FlowMatching(noise_repeats=0)


def test_contrastive_flow_matching_moves_the_target_away_from_the_negative():
    """With one fixed negative per row, contrastive flow matching's loss is (1 - lambda) times
    plain flow matching toward x_1 + lambda / (1 - lambda) (x_1 - negative), plus a constant: its
    gradient vanishes there. Rows without a negative, with the null condition or outside
    `contrastive_times` keep the plain loss."""
    lam, B = 0.5, 6
    x_1, negative, cond = rand(B, 16, 4, seed=30), rand(B, 16, 4, seed=31), rand(B, 3, 5, seed=32)
    x_0, t = rand(B, 16, 4, seed=33), torch.tensor([0.1, 0.2, 0.3, 0.4, 0.7, 0.9])
    has = torch.tensor([True, True, True, False, True, True])
    fm = FlowMatching(cond_drop_prob=0.0, contrastive_weight=lam, contrastive_times=(0.0, 0.5))
    moved = x_1 + lam / (1 - lam) * (x_1 - negative)  # (B, 16, 4)
    v = torch.nn.Parameter(velocity_target(x_0, moved))  # the minimiser for rows 0-2

    def model(x_t, t, cond, cond_mask):
        return v

    fm.loss(model, x_1, cond, x_0=x_0, t=t, negatives=negative, has_negative=has).loss.backward()
    assert v.grad[:3].abs().max() < 1e-6  # pushed rows: at their minimum
    assert v.grad[3:].abs().min(dim=-1).values.max() > 0  # no negative (3), t outside [0, 0.5] (4, 5)
    plain = FlowMatching(cond_drop_prob=0.0)
    w = torch.nn.Parameter(velocity_target(x_0, moved))
    plain.loss(lambda *_: w, x_1, cond, x_0=x_0, t=t).loss.backward()
    assert torch.allclose(v.grad[3:], w.grad[3:])  # those rows: the plain gradient
    # no negatives given, or weight 0: plain flow matching exactly
    off = FlowMatching(cond_drop_prob=0.0, contrastive_weight=0.0)
    for f, extra in ((fm, {}), (off, dict(negatives=negative, has_negative=has))):
        out = f.loss(lambda *_: 0.5 * x_0, x_1, cond, x_0=x_0, t=t, **extra)
        assert torch.equal(out.loss, plain.loss(lambda *_: 0.5 * x_0, x_1, cond, x_0=x_0, t=t).loss)
    # the null condition is not pushed: every row dropped gives the plain loss
    dropped = FlowMatching(cond_drop_prob=1.0, contrastive_weight=lam)
    out = dropped.loss(lambda *_: 0.5 * x_0, x_1, cond, x_0=x_0, t=t, negatives=negative, has_negative=has)
    assert torch.equal(out.loss, plain.loss(lambda *_: 0.5 * x_0, x_1, cond, x_0=x_0, t=t).loss)
    # noise repeats repeat the negatives with their rows
    rep = FlowMatching(cond_drop_prob=0.0, noise_repeats=2, contrastive_weight=lam)
    x_0r, t_r = rand(2 * B, 16, 4, seed=34), t.repeat_interleave(2)
    ref = FlowMatching(cond_drop_prob=0.0, contrastive_weight=lam).loss(
        lambda *_: 0.5 * x_0r, x_1.repeat_interleave(2, 0), cond.repeat_interleave(2, 0), x_0=x_0r, t=t_r,
        negatives=negative.repeat_interleave(2, 0), has_negative=has.repeat_interleave(2))
    out = rep.loss(lambda *_: 0.5 * x_0r, x_1, cond, x_0=x_0r, t=t_r, negatives=negative, has_negative=has)
    assert torch.allclose(out.loss, ref.loss)
    with pytest.raises(ValueError, match="contrastive_weight"):
        FlowMatching(contrastive_weight=1.0)
    with pytest.raises(ValueError, match="contrastive_times"):
        FlowMatching(contrastive_times=(0.6, 0.2))


def test_flow_matching_passes_null_condition_to_model_and_samples():
    fm = FlowMatching(cond_drop_prob=0.5, num_steps=4, guidance_scale=2.0)
    seen = {}

    def model(x_t, t, cond, cond_mask):
        seen["cond"] = cond
        return torch.zeros_like(x_t)

    cond = torch.ones(64, 3, 5)
    out = fm.loss(model, rand(64, 8, 2, seed=16), cond, generator=gen(17))
    assert 0 < out.dropped.sum() < 64
    assert torch.all(seen["cond"][out.dropped] == 0) and torch.all(seen["cond"][~out.dropped] == 1)

    res = fm.sample(lambda x, t, c, m: torch.ones_like(x), cond[:2], (8, 2), generator=gen(18))
    x_0 = torch.randn((2, 8, 2), generator=gen(18))
    assert torch.allclose(res.x_1, x_0 + 1, atol=1e-6)  # CFG of equal velocities is that velocity
    with pytest.raises(ValueError, match="time_sampling"):
        FlowMatching(time_sampling="sigmoid")
