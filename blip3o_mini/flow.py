"""Flow matching (rectified flow): the training objective and sampler of BLIP3-o's DiT.

Mirrors section 3 of BLIP3-o (arXiv 2505.09568), written in the style of minRF
(cloneofsimo/minRF) and facebookresearch/flow_matching: the *method* has no parameters and
knows nothing about the network; a model is any callable `model(x_t, t, cond, cond_mask) ->
v_pred`.

Time convention (DESIGN.md section 4, the paper's text):

    t = 0 is noise, t = 1 is data,     x_t = t * x_1 + (1 - t) * x_0,     v = x_1 - x_0

with `x_0 ~ N(0, I)` and `x_1` the data (CLIP features). The official BLIP3-o code, like every
diffusers flow scheduler, uses the reversed time `sigma = 1 - t` (sigma = 1 is noise) and the
model predicts `noise - data = -v`; `t_to_sigma` / `sigma_to_t` / `velocity_to_diffusers` map
between the two and `tests/test_flow.py` pins the mapping against diffusers'
`FlowMatchEulerDiscreteScheduler`.

Classifier-free guidance (as in BLIP3-o): during training 10% of samples get the *null
condition*, a tensor of zeros shaped like `cond`; at sampling the guided velocity is
`v_uncond + scale * (v_cond - v_uncond)` (scale 3.0, 30 Euler steps in the paper), at every
step; `guidance_interval` can limit it to part of the path.

Shape glossary: B batch, N tokens per sample (64 CLIP tokens), D feature width,
Nq condition tokens, C condition width. Everything here works for any `x` shaped (B, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# model(x_t (B, ...), t (B,), cond (B, Nq, C), cond_mask (B, Nq) | None) -> v_pred (B, ...)
VelocityModel = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]

TIME_SAMPLINGS = ("uniform", "logit_normal")


# ---------------------------------------------------------------------------- the path
def expand_t(t: Tensor, x: Tensor) -> Tensor:
    """Broadcast per-sample times (B,) against x (B, ...): returns (B, 1, ..., 1)."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x_0: Tensor, x_1: Tensor, t: Tensor) -> Tensor:
    """The straight path from noise to data: x_t = t * x_1 + (1 - t) * x_0."""
    t = expand_t(t, x_1)  # (B, 1, 1)
    return t * x_1 + (1 - t) * x_0  # (B, N, D)


def velocity_target(x_0: Tensor, x_1: Tensor) -> Tensor:
    """d x_t / dt along the straight path: constant in t."""
    return x_1 - x_0  # (B, N, D)


def t_to_sigma(t: Tensor | float) -> Tensor | float:
    """Our time -> diffusers' / official BLIP3-o code's sigma (sigma = 1 is pure noise)."""
    return 1 - t


def sigma_to_t(sigma: Tensor | float) -> Tensor | float:
    return 1 - sigma


def velocity_to_diffusers(v: Tensor) -> Tensor:
    """Our velocity (data - noise) -> the `model_output` diffusers' flow schedulers expect
    (noise - data, the derivative along sigma)."""
    return -v


def sample_t(batch_size: int, *, method: str = "uniform", generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> Tensor:
    """Training times in [0, 1): uniform (the paper) or logit-normal (SD3's choice)."""
    if method == "uniform":
        return torch.rand(batch_size, generator=generator, device=device)
    if method == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator, device=device))
    raise ValueError(f"unknown time sampling {method!r}; choose one of {TIME_SAMPLINGS}")


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Move times toward noise: SD3's timestep shift (arXiv 2403.03206, section 5.3.2),
    sigma -> shift * sigma / (1 + (shift - 1) * sigma) with sigma = 1 - t. Shift 1 is the
    identity. The more redundant the data's dimensions (high resolution there; 128-wide CLIP
    tokens carrying a few bits each here), the more noise it takes to hide what a sample is,
    and the more of training and sampling belongs at high noise, where the layout is decided."""
    if shift <= 0:
        raise ValueError(f"time shift must be > 0, got {shift}")
    if shift == 1.0:
        return t  # exactly: 1 - (1 - t) would round
    sigma = t_to_sigma(t)
    return sigma_to_t(shift * sigma / (1 + (shift - 1) * sigma))


def time_grid(num_steps: int, device: torch.device | str | None = None, shift: float = 1.0) -> Tensor:
    """The sampler's times t_0 = 0 < t_1 < ... < t_K = 1: equally spaced, then shifted
    toward noise by `shift` (1: no shift): (K+1,)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(torch.linspace(0.0, 1.0, num_steps + 1, device=device), shift)


# ---------------------------------------------------------------------------- CFG
def drop_condition(cond: Tensor, prob: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Replace each sample's condition by zeros (the null condition) with probability `prob`.

    Returns (cond with dropped rows zeroed (B, Nq, C), dropped (B,) bool)."""
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"condition drop probability must be in [0, 1], got {prob}")
    B = cond.shape[0]
    dropped = torch.rand(B, generator=generator, device=cond.device) < prob  # (B,)
    keep = expand_t((~dropped).to(cond.dtype), cond)  # (B, 1, 1)
    return cond * keep, dropped


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: scale 1 is the conditional model, 0 the unconditional one."""
    return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity(model: VelocityModel, scale: float,
                    interval: tuple[float, float] = (0.0, 1.0)) -> VelocityModel:
    """Wrap `model` so one call runs the conditional and the null (zeros) condition as one
    batch of 2B and returns the guided velocity; scale 1 skips the null pass. Outside the
    times `interval` = (lo, hi) the conditional velocity alone (Kynkaanniemi et al. 2024,
    "Applying Guidance in a Limited Interval"); the sampler gives every row the same t."""
    if scale == 1.0:
        return model
    lo, hi = interval

    def v(x_t: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor | None) -> Tensor:
        if not lo - 1e-6 <= float(t[0]) <= hi + 1e-6:  # inclusive despite float32 times (0.8 -> 0.80000001)
            return model(x_t, t, cond, cond_mask)  # (B, N, D)
        both = torch.cat([cond, torch.zeros_like(cond)])  # (2B, Nq, C)
        mask = None if cond_mask is None else torch.cat([cond_mask, cond_mask])  # (2B, Nq)
        v_cond, v_uncond = model(torch.cat([x_t, x_t]), torch.cat([t, t]), both, mask).chunk(2)
        return cfg_combine(v_cond, v_uncond, scale)  # (B, N, D)

    return v


# ---------------------------------------------------------------------------- sampler
@dataclass
class SampleResult:
    x_1: Tensor  # (B, N, D) the generated data
    trajectory: Tensor | None  # (K+1, B, N, D) x at every grid time, if asked for
    t: Tensor  # (K+1,) the time grid


@torch.no_grad()
def euler_sample(velocity: Callable[[Tensor, Tensor], Tensor], x_0: Tensor, num_steps: int,
                 return_trajectory: bool = False, time_shift: float = 1.0, start: float = 0.0,
                 sde_noise: float = 0.0, generator: torch.Generator | None = None) -> SampleResult:
    """Integrate dx/dt = velocity(x, t) from t = 0 (x_0, noise) to t = 1 with Euler steps.

    `velocity(x (B, ...), t (B,)) -> (B, ...)`. Exact for straight paths (constant velocity
    along each trajectory), which is what rectified flow aims for. With `start` > 0, `x_0` is
    the state at time `start` (a partly noised sample, SDEdit's and diffusers' img2img
    `strength = 1 - start`) and the grid covers [start, 1] only.

    With `sde_noise` = eta > 0 the steps are Euler-Maruyama steps of the SDE

        dx = [v - eta * (x - t v)] dt + sqrt(2 eta (1 - t)) dW,

    which has the ODE's marginals for the true velocity (x - t v is E[x_0 | x_t], so the added
    drift is eta (1 - t) times the score -E[x_0 | x_t] / (1 - t), and the noise's diffusion
    term cancels it in the Fokker-Planck equation). Fresh noise along the path lets a sample
    recover from the model's errors instead of carrying them to t = 1 (SiT, Ma et al. 2024,
    samples this way). eta = 0 is the ODE, BLIP3-o's sampler; the last step is always an ODE step."""
    if not 0.0 <= start < 1.0:
        raise ValueError(f"start must be in [0, 1), got {start}")
    if sde_noise < 0:
        raise ValueError(f"sde_noise must be >= 0 (0: the ODE), got {sde_noise}")
    ts = start + (1 - start) * time_grid(num_steps, device=x_0.device, shift=time_shift)  # (K+1,)
    x = x_0
    xs = [x] if return_trajectory else None
    for k in range(num_steps):
        t, dt = ts[k].expand(x.shape[0]), ts[k + 1] - ts[k]  # (B,), ()
        v = velocity(x, t)  # (B, N, D)
        if sde_noise > 0 and k < num_steps - 1:
            x0_hat = x - ts[k] * v  # E[x_0 | x_t]: (B, N, D)
            dw = torch.randn(x.shape, generator=generator,
                             device=generator.device if generator is not None else x.device).to(x)
            x = x + dt * (v - sde_noise * x0_hat) + (2 * sde_noise * (1 - ts[k]) * dt).sqrt() * dw
        else:
            x = x + dt * v  # (B, N, D)
        if xs is not None:
            xs.append(x)
    return SampleResult(x_1=x, trajectory=torch.stack(xs) if xs is not None else None, t=ts)


# ---------------------------------------------------------------------------- the method
def check_interval(interval, name: str = "guidance_interval") -> tuple[float, float]:
    """An interval of times [lo, hi] (a YAML list or a tuple) as a tuple, or a one-line error."""
    if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
        raise ValueError(f"{name} must be [lo, hi] with 0 <= lo <= hi <= 1 (times, 0 = noise), "
                         f"got {list(interval)}")
    return float(interval[0]), float(interval[1])


@dataclass
class FlowLoss:
    loss: Tensor  # () mean squared error over everything
    x_0: Tensor  # (B, N, D) noise
    t: Tensor  # (B,)
    x_t: Tensor  # (B, N, D)
    v_target: Tensor  # (B, N, D)
    v_pred: Tensor  # (B, N, D)
    dropped: Tensor  # (B,) bool: samples trained with the null condition


@dataclass
class FlowMatching:
    """BLIP3-o's recipe: uniform t, MSE on the velocity, 10% null condition, 30 Euler steps,
    CFG 3.0. No learnable parameters; defaults are the paper's numbers."""

    cond_drop_prob: float = 0.1
    time_sampling: str = "uniform"
    # SD3's timestep shift, applied to the training times and the sampler's grid alike
    # (`shift_time`). BLIP3-o: 1 (none).
    time_shift: float = 1.0
    num_steps: int = 30
    guidance_scale: float = 3.0
    # Times t (0 = noise) at which CFG applies; the conditional velocity alone elsewhere
    # (`guided_velocity`). BLIP3-o: [0, 1], every step.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # Noise injected along the sampling path (`euler_sample`'s eta). BLIP3-o: 0, the ODE.
    sde_noise: float = 0.0
    # (x_0, t) draws per (x_1, cond) row. The condition costs a pass through the frozen LLM
    # (forward and backward to the queries) while the DiT is small, so reusing each condition
    # for several noisy copies buys DiT samples cheaply (MAR's `diffusion_batch_mul`, 4 there).
    # BLIP3-o: 1.
    noise_repeats: int = 1
    # Contrastive flow matching (Stoica et al. 2025, arXiv 2506.05350): rows given a negative
    # x_1 (an image their condition does not describe, `loss(negatives=...)`) also push the
    # prediction away from the negative's flow from the same noise, with this weight lambda, at
    # training times inside `contrastive_times`. BLIP3-o: 0 (plain flow matching).
    contrastive_weight: float = 0.0
    contrastive_times: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"unknown time_sampling {self.time_sampling!r}; choose one of {TIME_SAMPLINGS}")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
        if self.noise_repeats < 1:
            raise ValueError(f"noise_repeats must be >= 1, got {self.noise_repeats}")
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")
        if self.sde_noise < 0:
            raise ValueError(f"sde_noise must be >= 0 (0: the ODE sampler), got {self.sde_noise}")
        self.guidance_interval = check_interval(self.guidance_interval)
        if not 0.0 <= self.contrastive_weight < 1.0:
            raise ValueError(f"contrastive_weight must be in [0, 1) (0: plain flow matching; at 1 the loss has "
                             f"no minimum), got {self.contrastive_weight}")
        self.contrastive_times = check_interval(self.contrastive_times, "contrastive_times")

    def loss(self, model: VelocityModel, x_1: Tensor, cond: Tensor, cond_mask: Tensor | None = None,
             *, x_0: Tensor | None = None, t: Tensor | None = None,
             generator: torch.Generator | None = None, negatives: Tensor | None = None,
             has_negative: Tensor | None = None) -> FlowLoss:
        """One training loss. `x_0` and `t` may be given (tests, notebooks); else sampled.
        With `noise_repeats` r > 1 every row of `x_1` and `cond` is repeated r times first, so
        given `x_0` / `t` are for B * r rows.

        `negatives` (B, N, D), with `has_negative` (B,) bool marking the rows that have one: with
        `contrastive_weight` lambda > 0, each such row whose condition was kept and whose t lies
        in `contrastive_times` adds -lambda * |v_pred - (negative - x_0)|^2 to its squared error.
        For one fixed negative per row this is (1 - lambda) times plain flow matching toward
        x_1 + lambda / (1 - lambda) * (x_1 - negative), plus a constant: the target moves away
        from the negative, by what tells the two apart (for a relation caption and the same
        scene with the objects' places swapped, the layout alone)."""
        if self.noise_repeats > 1:
            r = self.noise_repeats
            x_1, cond = x_1.repeat_interleave(r, 0), cond.repeat_interleave(r, 0)  # (B*r, N, D), (B*r, Nq, C)
            cond_mask = None if cond_mask is None else cond_mask.repeat_interleave(r, 0)  # (B*r, Nq)
            if negatives is not None:
                negatives, has_negative = negatives.repeat_interleave(r, 0), has_negative.repeat_interleave(r, 0)
        B = x_1.shape[0]
        if x_0 is None:
            x_0 = torch.randn(x_1.shape, generator=generator, device=x_1.device, dtype=x_1.dtype)
        if t is None:
            t = shift_time(sample_t(B, method=self.time_sampling, generator=generator, device=x_1.device),
                           self.time_shift)  # (B,)
        cond, dropped = drop_condition(cond, self.cond_drop_prob, generator)  # (B, Nq, C), (B,)
        x_t = interpolate(x_0, x_1, t)  # (B, N, D)
        v_target = velocity_target(x_0, x_1)  # (B, N, D)
        v_pred = model(x_t, t, cond, cond_mask)  # (B, N, D)
        loss = F.mse_loss(v_pred.float(), v_target.float())
        if negatives is not None and self.contrastive_weight > 0:
            lo, hi = self.contrastive_times
            push = has_negative & ~dropped & (t >= lo) & (t <= hi)  # (B,): not the null condition
            v_negative = velocity_target(x_0, negatives)  # (B, N, D)
            away = (v_pred.float() - v_negative.float()).pow(2).flatten(1).mean(1)  # (B,)
            loss = loss - self.contrastive_weight * (away * push).mean()
        return FlowLoss(loss, x_0, t, x_t, v_target, v_pred, dropped)

    def sample(self, model: VelocityModel, cond: Tensor, shape: tuple[int, ...],
               cond_mask: Tensor | None = None, *, x_0: Tensor | None = None,
               num_steps: int | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None, return_trajectory: bool = False,
               start: float = 0.0, sde_noise: float | None = None,
               guidance_interval: tuple[float, float] | None = None) -> SampleResult:
        """Generate data of per-sample `shape` (e.g. (64, D)) for each condition row (B, Nq, C);
        with `start` > 0, finish `x_0` given as the state at that time (`euler_sample`), by
        default in the steps the full path would spend on what is left of it. `generator`
        draws `x_0` (when not given) and the SDE's noise (`sde_noise` > 0)."""
        B = cond.shape[0]
        if x_0 is None:
            x_0 = torch.randn((B, *shape), generator=generator, device=cond.device, dtype=cond.dtype)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        interval = self.guidance_interval if guidance_interval is None else check_interval(guidance_interval)
        v = guided_velocity(model, scale, interval)
        if num_steps is None:  # the sampler's step size: 30 steps from 0 are 15 from 0.5
            num_steps = max(1, round(self.num_steps * (1 - start)))
        return euler_sample(lambda x, t: v(x, t, cond, cond_mask), x_0, num_steps, return_trajectory,
                            self.time_shift, start, self.sde_noise if sde_noise is None else sde_noise, generator)
