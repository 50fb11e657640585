"""`compile:` (training/compile.py): the DiT's and the understanding backbone's compiled training
steps compute what the eager ones do, `auto` falls back to eager without a compiler, and the
setting never retrains a stage."""

import shutil

import blip3o_mini.training.compile as compile_setting

import pytest
import torch

from blip3o_mini.artifacts import fingerprint
from blip3o_mini.backbone import BackboneConfig, ToyBackbone
from blip3o_mini.config import load_config
from blip3o_mini.generation_stage import training_section
from blip3o_mini.training.compile import check_compile, compiler_found, use_compile, without_speed_keys
from blip3o_mini.training.distributed import TrainerConfig
from blip3o_mini.training.generation import GenerationModule, GenerationTrainConfig
from blip3o_mini.training.generation_run import generation_run
from blip3o_mini.training.packing import Packer
from blip3o_mini.training.understanding import (UnderstandingModule, UnderstandingTrainConfig, collate,
                                                conversation, train_understanding)
from test_generation import F, tiny_generator, wake_up
from test_understanding import ROWS, tiny_backbone, tok  # noqa: F401  (tok: a fixture)
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


def toy_lm_backbone(tok):
    """A real `Backbone` (the toy LM, width K): its LM pass for Q is compiled too."""
    torch.manual_seed(0)
    cfg = BackboneConfig(vision_dim=16, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return ToyBackbone(cfg, tok).freeze()


@pytest.mark.skipif(not compiler_found(cuda=False), reason="torch.compile on CPU needs a C++ compiler (g++)")
@pytest.mark.parametrize("backbone", ["tiny stand-in", "toy LM"])
def test_compiled_training_step_matches_the_eager_one(tok, backbone):
    torch.manual_seed(0)
    gen = tiny_generator()
    bb = TinyBackbone().eval() if backbone == "tiny stand-in" else toy_lm_backbone(tok)
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
    assert (module._run_lm is not None) == (backbone == "toy LM")  # only a `Backbone` has run_lm
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, g in grads.items():  # the queries' too: the gradient still flows back through Q
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert "_dit_forward" not in dict(module.named_modules()) and not any(
        "_orig_mod" in k for k in module.state_dict())  # the weights stay registered once


# ------------------------------------------------------------------------------ the understanding recipe
def test_understanding_compile_setting_is_checked_and_left_out_of_the_fingerprint():
    with pytest.raises(ValueError, match="understanding.train.compile must be true, false or auto"):
        UnderstandingTrainConfig(compile="yes")
    section = {"backbone": {"hidden_size": 64}, "train": {"max_steps": 10}}
    assert without_speed_keys({**section, "train": {"max_steps": 10, "compile": True}}) == section
    assert without_speed_keys({"backbone": {}}) == {"backbone": {}}  # no train: section, nothing to drop
    assert without_speed_keys({"train": {"compile": "auto"}}) == {}  # toy.yaml's understanding: section


def test_compile_settings_keep_the_toy_runs_stage_fingerprints():
    """toy.yaml's `compile: auto` lines must not retrain the stages of a toy run made before them."""
    toy = load_config("toy")

    def without_compile(section: dict) -> dict:
        return {k: v for k, v in section.items() if k != "train"} | {"train": {k: v for k, v in section["train"].items() if k != "compile"}}

    before = {"understanding": without_compile(toy["understanding"]), "generation": without_compile(toy["generation"])}
    assert "compile" in toy["understanding"]["train"] and "compile" in toy["generation"]["train"]
    assert without_speed_keys(toy.get("understanding", {})) == before["understanding"]
    assert training_section(toy["generation"]) == training_section(before["generation"])
    assert without_speed_keys({"train": {"compile": "auto"}}) == without_speed_keys({}) == {}  # a section of speed keys only


@pytest.mark.skipif(not compiler_found(cuda=False), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_understanding_step_matches_the_eager_one(tok):
    rows = sorted(Packer(tok, 64).pack_many([conversation(r) for r in ROWS[:10]]), key=lambda r: len(r.input_ids))
    feats = torch.randn(len(rows), 64, 16)
    batches = [collate(list(zip(feats[:2], rows[:2])), tok.pad_token_id),  # the shortest rows ...
               collate(list(zip(feats[-2:], rows[-2:])), tok.pad_token_id)]  # ... and the longest
    assert batches[0]["input_ids"].shape[1] < batches[1]["input_ids"].shape[1]
    bb = tiny_backbone(tok).train()
    results = []
    for setting in (False, True):
        module = UnderstandingModule(bb, UnderstandingTrainConfig(compile=setting))
        module.log = lambda *a, **k: None
        for batch in batches:  # two row lengths: the compiled graph's T is symbolic
            loss = module.training_step(batch, 0)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in bb.named_parameters() if p.grad is not None}))
            bb.zero_grad()
    assert module.compiled and module._run_lm is not None
    for (eager_loss, eager_grads), (loss, grads) in zip(results[:2], results[2:]):
        torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
        assert grads.keys() == eager_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert not any("_orig_mod" in k for k in module.state_dict())  # the weights stay registered once


def test_train_understanding_resolves_auto_for_the_trainers_device(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler ...
    monkeypatch.setattr(compile_setting, "find_spec", lambda name: object())  # ... but Triton
    cfg = UnderstandingTrainConfig(batch_size=4, max_steps=1, warmup_steps=1, compile="auto")
    with monkeypatch.context() as gpu_machine:  # judged by the machine alone, a GPU one compiles
        gpu_machine.setattr(torch.cuda, "is_available", lambda: True)
        assert UnderstandingModule(tiny_backbone(tok), cfg).compiled
    result = train_understanding(tiny_backbone(tok), torch.randn(4, 64, 16), ROWS[:4], cfg, tmp_path,
                                 trainer=TrainerConfig(accelerator="cpu", precision="32-true"))
    assert result.steps == 1  # a CPU job found no C++ compiler, so it trained eagerly
    assert not result.trainer.lightning_module.compiled and result.extra["train_compiled"] is False  # in metrics.json


@pytest.mark.skipif(not compiler_found(cuda=False), reason="torch.compile on CPU needs a C++ compiler (g++)")
def test_compiled_decoder_step_matches_the_eager_one():
    from test_decoder import features, tiny_cfg

    from blip3o_mini.training.decoder import DecoderModule, DecoderTrainConfig

    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    batch = (images, features(4, 0))
    results = []
    for setting in (False, True):
        torch.manual_seed(0)  # the same weights, and the same noise, times and dropped conditions
        module = DecoderModule(tiny_cfg(), DecoderTrainConfig(compile=setting))
        module.log = lambda *a, **k: None
        loss = module.training_step(batch, 0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in module.decoder.named_parameters() if p.grad is not None}))
    assert module.compiled and module._forward is not None
    (eager_loss, eager_grads), (loss, grads) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)
    assert not any("_orig_mod" in k for k in module.state_dict())  # the weights stay registered once


def test_decoder_compile_setting_is_checked_resolved_for_the_trainer_and_left_out_of_the_fingerprint(
        tmp_path, monkeypatch):
    from test_decoder import features, tiny_cfg

    from blip3o_mini.decoder_stage import decoder_key
    from blip3o_mini.training.decoder import DecoderTrainConfig, train_decoder

    with pytest.raises(ValueError, match="decoder.train.compile must be true, false or auto"):
        DecoderTrainConfig(compile="on")
    toy = load_config("toy")

    def key(**train) -> str:  # the toy config's decoder stage, its train: section updated
        return decoder_key(toy | {"decoder": toy["decoder"] | {"train": toy["decoder"]["train"] | train}}, "clip")

    assert key(compile=False) == key(compile=True)
    assert key(compile=False, max_steps=901) != key(compile=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler ...
    monkeypatch.setattr(compile_setting, "find_spec", lambda name: object())  # ... but Triton
    cfg = DecoderTrainConfig(batch_size=4, max_steps=1, warmup_steps=1, compile="auto", checkpoint_every=1000)
    result = train_decoder(tiny_cfg(), cfg, torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8),
                           features(4, 0), tmp_path / "ckpt", trainer=TrainerConfig(accelerator="cpu", precision="32-true"))
    assert result.compiled is False  # a CPU job found no C++ compiler, so it trained eagerly
