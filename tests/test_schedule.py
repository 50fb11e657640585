"""The one learning-rate schedule of every recipe (training/schedule.py)."""

import math

import pytest
import torch

from blip3o_mini.training.schedule import adamw, cosine_with_warmup, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    assert cosine_with_warmup(0, 10, 100, 0.1) == pytest.approx(0.1)  # (0 + 1) / 10
    assert cosine_with_warmup(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100, 0.1) == pytest.approx(0.55)  # half way: the mean of 1 and 0.1
    assert cosine_with_warmup(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert cosine_with_warmup(500, 10, 100, 0.1) == pytest.approx(0.1)  # stays at the floor
    assert cosine_with_warmup(0, 0, 100, 0.0) == pytest.approx(1.0)  # no warmup


def test_the_scheduler_steps_the_optimizer_and_resumes():
    def run(steps, state=None):
        p = torch.nn.Parameter(torch.zeros(1))
        out = warmup_cosine(torch.optim.AdamW([p], lr=2e-3), warmup=3, total=20, min_ratio=0.05)
        opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
        assert out["lr_scheduler"]["interval"] == "step"
        if state is not None:  # as Lightning restores a checkpoint: optimizer and scheduler
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return lrs, (opt.state_dict(), sched.state_dict())

    lrs, _ = run(20)
    assert lrs == pytest.approx([2e-3 * cosine_with_warmup(s, 3, 20, 0.05) for s in range(20)])
    first, state = run(8)
    second, _ = run(12, state)  # a resumed run continues on the same curve
    assert first + second == pytest.approx(lrs)
    assert math.isclose(max(lrs), 2e-3)


def test_adamw_is_fused_on_cpu_and_updates_as_the_loop_does():
    """`adamw` picks the fused kernel for CPU float parameters; the weights follow the plain
    per-tensor AdamW to float precision, groups (and their weight decay) kept, and an
    unfused optimizer's state (an older checkpoint) loads into it."""
    torch.manual_seed(0)
    init = [torch.randn(5, 3), torch.randn(3)]
    grads = [[torch.randn_like(w) for w in init] for _ in range(4)]

    def train(make):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = make([{"params": [params[0]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}])
        for g in grads:
            for p, gp in zip(params, g):
                p.grad = gp.clone()
            opt.step()
        return params, opt

    fused, fused_opt = train(lambda groups: adamw(groups, lr=1e-2, betas=(0.9, 0.98)))
    loop, loop_opt = train(lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.98), foreach=False))
    assert all(g["fused"] for g in fused_opt.param_groups)
    assert [g["weight_decay"] for g in fused_opt.param_groups] == [0.1, 0.0]
    for a, b in zip(fused, loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, init[0] if a.ndim == 2 else init[1])  # the weights moved
    fused_opt.load_state_dict(loop_opt.state_dict())
    fused_opt.step()  # resumes with the loop's moments


def test_adamw_accepts_a_parameter_generator():
    model = torch.nn.Linear(3, 2)
    opt = adamw(model.parameters(), lr=1e-3)
    assert len(opt.param_groups[0]["params"]) == 2 and opt.param_groups[0]["fused"]
