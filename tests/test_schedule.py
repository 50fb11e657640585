"""The one learning-rate schedule of every recipe (training/schedule.py)."""

import math

import pytest
import torch

from blip3o_mini.training.schedule import cosine_with_warmup, warmup_cosine


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
