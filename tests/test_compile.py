"""`compile:` (training/compile.py): the DiT's compiled training step computes what the eager one
does, `auto` falls back to eager without a compiler, and the setting never retrains a stage."""

import shutil

import blip3o_mini.training.compile as compile_setting

import pytest
import torch

from blip3o_mini.artifacts import fingerprint
from blip3o_mini.generation_stage import training_section
from blip3o_mini.training.compile import check_compile, compiler_found, use_compile
from blip3o_mini.training.generation import GenerationModule, GenerationTrainConfig
from blip3o_mini.training.generation_run import generation_run
from test_generation import F, tiny_generator, wake_up
from tiny_backbone import TinyBackbone  # tests/tiny_backbone.py


def test_compile_setting_resolves_and_rejects_typos(monkeypatch):
    assert use_compile(True) is True and use_compile(False) is False
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a laptop without a C++ compiler
    assert use_compile("auto", cuda=False) is False
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert use_compile("auto", cuda=False) is True
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="must be true, false or auto"):
            check_compile(bad)
    with pytest.raises(ValueError, match="generation.train.compile must be true, false or auto"):
        GenerationTrainConfig(compile="on")


def test_compile_is_a_speed_setting_not_part_of_the_stage_fingerprint():
    section = {"dit": {"dim": 32}, "flow": {"guidance_scale": 5.0}, "train": {"max_steps": 10}}
    key = fingerprint(training_section(section))
    assert fingerprint(training_section({**section, "train": {"max_steps": 10, "compile": "auto"}})) == key
    assert fingerprint(training_section({**section, "train": {"max_steps": 20}})) != key


def test_auto_without_a_compiler_trains_the_eager_dit(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    module = GenerationModule(tiny_generator(), TinyBackbone(), GenerationTrainConfig(compile="auto"))
    module.log = lambda *a, **k: None
    module.training_step((["a red circle"], torch.randn(1, 64, F)), 0)
    assert not module.compiled and module._dit_forward is None


@pytest.mark.parametrize("accelerator, compiled", [("cpu", True), ("gpu", False)])
def test_auto_looks_for_the_compiler_of_the_trainers_device(monkeypatch, accelerator, compiled):
    # A GPU machine with a C++ compiler but no Triton: a CPU job compiles, a GPU job cannot.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(compile_setting, "find_spec", lambda name: None)
    cfg = {"generation": {"num_query_tokens": 4, "feature_norm": "none",
                          "dit": {"dim": 32, "depth": 1, "num_heads": 2, "multiple_of": 16},
                          "train": {"batch_size": 2, "max_steps": 1, "compile": "auto"}},
           "trainer": {"accelerator": accelerator, "precision": "32-true"}}
    dataset = [("a red circle", torch.randn(64, F))] * 4
    run = generation_run(cfg, TinyBackbone(), dataset, F)
    assert run.module.compiled is compiled and run.data.drop_last is compiled


@pytest.mark.skipif(not compiler_found(cuda=False), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_training_step_matches_the_eager_one():
    torch.manual_seed(0)
    gen, bb = tiny_generator(), TinyBackbone().eval()
    wake_up(gen.dit)
    prompts, feats = ["a red circle", "two blue squares"], torch.randn(2, 64, F)
    results = []
    for setting in (False, True):
        module = GenerationModule(gen, bb, GenerationTrainConfig(compile=setting))
        module.log = lambda *a, **k: None
        torch.manual_seed(1)  # the same noise, times and condition dropout
        loss = module.training_step((prompts, feats), 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in gen.named_parameters()}))
        gen.zero_grad()
    assert module.compiled and module._dit_forward is not None
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():  # the queries' too: the gradient still flows back through Q
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert "_dit_forward" not in dict(module.named_modules()) and not any(
        "_orig_mod" in k for k in module.state_dict())  # the weights stay registered once
