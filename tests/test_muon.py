"""Muon for the DiT's hidden matrices, AdamW for the rest (blip3o_mini/training/muon.py),
checked against torch's own optimizers."""

import pytest
import torch
from torch import nn

from blip3o_mini.training import muon
from blip3o_mini.training.muon import MuonAdamW, hidden_matrices, newton_schulz, with_muon_group


def steps(opt, params, grads):
    for g in grads:  # the same gradient sequence for every optimizer compared
        for p, gi in zip(params, g):
            p.grad = gi.clone()
        opt.step()


def test_muon_groups_step_as_torch_muon_with_adamw_scaling(monkeypatch):
    """Same-shape matrices go through Newton-Schulz as one batch: the result is torch's
    one-at-a-time Muon exactly (both in bf16), wide and tall matrices alike."""
    monkeypatch.setattr(muon, "ns_dtype", lambda device: torch.bfloat16)  # torch's, on any CPU
    torch.manual_seed(0)
    shapes = [(24, 16), (24, 16), (16, 24)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    steps(MuonAdamW([{"params": ours, "muon": True}], lr=0.02, weight_decay=0.1), ours, grads)
    steps(torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), ref, grads)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("fused", [False, True])
def test_other_groups_step_as_torch_adamw(fused):
    """The AdamW groups, one tensor at a time or in torch's fused kernel (`fused`, the CLIP recipe)."""
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    ours, ref = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    grads = [[torch.randn(7, 5)] for _ in range(4)]
    opt = MuonAdamW([ours], lr=0.01, weight_decay=0.05, betas=(0.9, 0.98), fused=fused)
    steps(opt, [ours], grads[:2])
    resumed = MuonAdamW([ours], lr=0.01, weight_decay=0.05, betas=(0.9, 0.98), fused=fused)
    resumed.load_state_dict(opt.state_dict())  # as from a checkpoint: the moments and step counts
    steps(resumed, [ours], grads[2:])
    assert int(resumed.state[ours]["step"]) == 4
    steps(torch.optim.AdamW([ref], lr=0.01, weight_decay=0.05, betas=(0.9, 0.98), foreach=False), [ref], grads)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_newton_schulz_flattens_the_spectrum(dtype):
    torch.manual_seed(0)
    g = torch.randn(32, 8) @ torch.diag(torch.logspace(-1.5, 0.5, 8))  # singular values over 2 decades
    s = torch.linalg.svdvals(newton_schulz(g, dtype=dtype).float())
    assert s.min() > 0.5 and s.max() < 1.5, s  # every direction moves at about the same rate


def test_newton_schulz_runs_in_fp32_on_cpus_without_bf16(monkeypatch):
    """Such CPUs emulate bf16 products (hundreds of times slower): Newton-Schulz uses fp32 there."""
    from blip3o_mini.training import distributed

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: False)
    assert muon.ns_dtype(torch.device("cpu")) == torch.float32
    assert muon.ns_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: True)
    assert muon.ns_dtype(torch.device("cpu")) == torch.bfloat16


def test_only_matrices_go_to_muon():
    block = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4, bias=False))
    mats = hidden_matrices(block)
    assert [tuple(p.shape) for p in mats] == [(8, 4), (4, 8)]  # biases and the norm stay with AdamW
    adamw, muon = with_muon_group([{"params": list(block.parameters()), "lr": 0.1}], mats)
    assert adamw["lr"] == 0.1 and len(adamw["params"]) == 3 and muon == {"params": mats, "muon": True}
    with pytest.raises(ValueError, match="Muon steps 2-D weights only, got shapes \\[\\(8,\\)\\]"):
        MuonAdamW([{"params": [block[0].bias], "muon": True}], lr=0.1)


def test_generation_recipe_puts_the_dit_blocks_matrices_in_muon():
    from blip3o_mini.generation import Blip3oGenerator, GeneratorConfig
    from blip3o_mini.training.generation import GenerationModule, GenerationTrainConfig
    from tiny_backbone import TinyBackbone  # tests/tiny_backbone.py

    gen = Blip3oGenerator(GeneratorConfig(num_query_tokens=4, dit=dict(dim=32, depth=2, num_heads=2, multiple_of=16)),
                          feature_dim=16, cond_dim=32)
    cfg = GenerationTrainConfig(lr=4e-3, max_steps=10, query_lr_scale=0.1, optimizer="muon")
    opt = GenerationModule(gen, TinyBackbone(), cfg).configure_optimizers()["optimizer"]
    rest, queries, muon = opt.param_groups
    assert isinstance(opt, MuonAdamW) and muon["muon"] and not rest["muon"]
    assert {id(p) for p in muon["params"]} == {id(p) for p in hidden_matrices(gen.dit.blocks)}
    assert queries["params"] == [gen.queries] and any(p is gen.dit.x_embed.weight for p in rest["params"])
    with pytest.raises(ValueError, match="optimizer must be adamw or muon, got 'sgd'"):
        GenerationTrainConfig(optimizer="sgd")


def test_bench_optimizer_step_times_both_optimizers(monkeypatch):
    """benchmarks/bench_optimizer_step.py times AdamW and MuonAdamW on the toy config's DiT."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_optimizer_step

    rows = bench_optimizer_step.main(["--steps", "1", "--warmup", "0"])
    assert len(rows) == 5 and all(ms > 0 for ms in rows.values())


def test_sharding_strategies_are_refused():
    """DeepSpeed ZeRO and FSDP hand the optimizer flat shards: Muon would orthogonalise slices."""
    from types import SimpleNamespace

    from blip3o_mini.training.muon import check_unsharded

    FSDPStrategy = type("FSDPStrategy", (), {})
    with pytest.raises(ValueError, match="generation.train.optimizer: muon needs every weight matrix whole "
                                         "on each rank, but FSDPStrategy shards them"):
        check_unsharded(SimpleNamespace(strategy=FSDPStrategy()), "generation.train.optimizer")
    check_unsharded(SimpleNamespace(strategy=type("DDPStrategy", (), {})()), "generation.train.optimizer")
    check_unsharded(None, "generation.train.optimizer")  # configure_optimizers outside a Trainer
