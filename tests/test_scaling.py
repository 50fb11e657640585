"""Scaling: configs, parameter counts on the meta device, memory estimates, data sharding and
resumption, offline CLIP-target extraction, one training step per config, DDP == one process."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blip3o_mini import cli
from blip3o_mini.config import available_configs, load_config
from blip3o_mini.data.sharding import ShardedSampler
from blip3o_mini.training.distributed import (add_trainer_arguments, apply_trainer_arguments,
                                              check_global_batch, trainer_config)

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "data" / "fixtures" / "shapesworld-sample-000000.tar"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared CPU: a second thread only adds contention (10x slower steps
    measured under load), so this file runs single-threaded (as tests/test_dit.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def ddp_job(tmp_path_factory):
    """The 2-process DDP run starts first and runs while the other tests do (a subprocess:
    Lightning's `ddp` launcher re-executes its script, which must not be pytest)."""
    out = tmp_path_factory.mktemp("ddp")
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "ddp_script.py"), str(out), "--devices", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    yield out, proc
    if proc.poll() is None:
        proc.kill()


# ------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("n, world, batch", [(16, 2, 2), (11, 3, 2), (20, 4, 3), (7, 1, 3)])
def test_every_sample_once_per_epoch_on_disjoint_ranks(n, world, batch):
    for epoch in (0, 1):
        parts = []
        for r in range(world):
            s = ShardedSampler(n, batch, r, world, seed=3)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(s) == len(parts[-1])
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(n)), (epoch, parts)
    one = ShardedSampler(n, batch * world, 0, 1, seed=3)  # one process, same global batch
    merged = [i for k in range(len(one.batches())) for r in range(world)
              for i in ShardedSampler(n, batch, r, world, seed=3).batches()[k]]
    assert merged == list(one)  # the ranks' k-th batches together are the 1-process k-th batch
    e0, e1 = list(ShardedSampler(n, batch, seed=3)), ShardedSampler(n, batch, seed=3)
    e1.set_epoch(1)
    assert n < 8 or e0 != list(e1)  # reshuffled every epoch


def test_resume_mid_epoch_neither_repeats_nor_skips():
    n, world, batch = 23, 2, 3
    done = {r: [] for r in range(world)}
    samplers = [ShardedSampler(n, batch, r, world, seed=1) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    for r, s in enumerate(samplers):
        done[r] += [i for b in s.batches()[:2] for i in b]
        s.advance(2)  # two global batches trained
    state = samplers[0].state_dict()
    assert state["epoch"] == 2 and state["position"] == 2 * batch * world
    rest = []
    for r in range(world):
        fresh = ShardedSampler(n, batch, r, world, seed=1)
        fresh.load_state_dict(state)
        fresh.set_epoch(2)  # Lightning calls it again on resume: same epoch keeps the position
        rest += list(fresh)
    seen = done[0] + done[1] + rest
    assert sorted(seen) == list(range(n))
    # the state does not depend on the world size: resume the same epoch on 3 ranks
    rest3 = []
    for r in range(3):
        s3 = ShardedSampler(n, 2, r, 3, seed=1)
        s3.load_state_dict(state)
        rest3 += list(s3)
    assert sorted(done[0] + done[1] + rest3) == list(range(n))
    nxt = ShardedSampler(n, batch, 0, world, seed=1)
    nxt.load_state_dict(state)
    nxt.set_epoch(3)
    assert nxt.position == 0


def test_sampler_bad_input_is_clear():
    with pytest.raises(ValueError, match="rank would get none"):
        ShardedSampler(9, 4, 0, 2)  # last global batch: 1 sample for 2 ranks
    assert len(ShardedSampler(9, 4, 1, 2, drop_last=True)) == 4
    with pytest.raises(ValueError, match="rank < world_size"):
        ShardedSampler(10, 2, 2, 2)
    with pytest.raises(ValueError, match="same dataset and seed"):
        ShardedSampler(10, 2).load_state_dict({"epoch": 0, "position": 4, "num_samples": 12})


# ------------------------------------------------------------------------------ configs and flags
def test_full_configs_follow_blip3o_recipe():
    for name, hidden in (("full-4b", 2048), ("full-8b", 3584)):
        cfg = load_config(name)
        gen, train, trainer = cfg["generation"], cfg["generation"]["train"], cfg["trainer"]
        assert cfg["clip"]["model_name"] == "EVA02-E-14-plus" and cfg["clip"]["image_size"] == 448
        assert gen["num_query_tokens"] == 64 and gen["dit"] | {"gradient_checkpointing": True} == gen["dit"]
        assert (gen["dit"]["dim"], gen["dit"]["depth"], gen["dit"]["num_heads"]) == (1792, 24, 28)
        assert (train["lr"], train["min_lr"], train["weight_decay"], train["grad_clip"]) == (1e-4, 1e-5, 0.0, 1.0)
        assert train["warmup_steps"] == round(0.003 * train["max_steps"])
        tc = trainer_config(cfg)
        assert (tc.strategy, tc.precision) == ("deepspeed_stage_1", "bf16-mixed")
        assert check_global_batch(tc, train["batch_size"]) == 512 == tc.world_size * train["batch_size"]
        assert trainer["devices"] * trainer["num_nodes"] == 32  # BLIP3-o: 32 GPUs
        assert "BLIP3o-60k" in cfg["data"]["instruct_shards"] and cfg["data"]["targets"] == "features"
        assert all("BLIP3o-Pretrain" in s for s in cfg["data"]["shards"])
        assert cfg["understanding"]["pretrained"].endswith(f"{'7B' if hidden == 3584 else '3B'}-Instruct")
    assert trainer_config(load_config("small")).devices == 1


def test_sharded_configs_train_only_with_adamw():
    """Muon orthogonalises whole matrices, so a config whose strategy shards them (DeepSpeed ZeRO,
    FSDP) must not inherit the toy's `optimizer: muon` in any stage it trains (training/muon.py
    would raise at the first step, after the cluster job has loaded everything)."""
    sharded = []
    for name in available_configs():
        cfg = load_config(name)
        if not any(s in str(trainer_config(cfg).strategy) for s in ("deepspeed", "fsdp")):
            continue
        gen = cfg["generation"]["train"]
        trained = {"generation": gen, "instruct": {**gen, **cfg.get("instruct", {}).get("train", {})},
                   "clip": cfg["clip"]["train"] if cfg["clip"]["train"].get("max_steps") else {},
                   "understanding": {} if cfg["understanding"].get("pretrained") else cfg["understanding"].get("train", {})}
        assert {k: t.get("optimizer", "adamw") for k, t in trained.items()} == dict.fromkeys(trained, "adamw"), name
        sharded.append(name)
    assert sharded == ["full-4b", "full-8b"]


def leaves(cfg: dict, prefix: str = "") -> dict:
    """A nested config flattened to {"section.key": value}."""
    out = {}
    for k, v in cfg.items():
        out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


def test_ci_config_is_the_toy_run_with_shorter_schedules():
    """CI's notebooks read the `ci` run: it must differ from the toy run only in how long each stage
    trains and how many images the decoder and evaluation stages score, never in data, models or code paths."""
    from blip3o_mini.evaluation_stage import EvaluationConfig
    from blip3o_mini.training.understanding import UnderstandingTrainConfig

    # toy.yaml leaves these two to the dataclass defaults (700 steps; all 54 prompts of a tag)
    toy = {"understanding.train.max_steps": UnderstandingTrainConfig().max_steps,
           "evaluation.prompts_per_tag": EvaluationConfig().prompts_per_tag} | leaves(load_config("toy"))
    ci = leaves(load_config("ci"))
    assert set(ci) == set(toy)
    changed = {k for k in toy if toy[k] != ci[k]}
    assert changed <= {"run_dir", "decoder.eval.num_images", "evaluation.prompts_per_tag"} | {k for k in toy if k.endswith("max_steps")}
    assert all(ci[k] < toy[k] for k in changed if k.endswith("max_steps"))
    assert toy["evaluation.prompts_per_tag"] is None and ci["evaluation.prompts_per_tag"] < 54


def test_understanding_configs_change_only_the_understanding_stage():
    """The relation and counting experiments (docs/status.md) must be the toy run with understanding options
    changed, so their VQA figures compare with the toy's; the ladder starts from toy-no-aids (every aid off)
    and its last rung, toy-grid-sincos, is the toy's own recipe."""
    from dataclasses import asdict

    from blip3o_mini.backbone import BackboneConfig
    from blip3o_mini.config import build
    from blip3o_mini.training.understanding import UnderstandingTrainConfig

    def resolved(section):  # (train, backbone) with the dataclass defaults filled in
        return (asdict(build(UnderstandingTrainConfig, section.get("train") or {})),
                asdict(build(BackboneConfig, section.get("backbone") or {})))

    toy = leaves(load_config("toy"))
    ladder = ("toy-no-aids", "toy-relation", "toy-relation-turns", "toy-vqa", "toy-directions", "toy-grid-sincos")
    for name in ladder:
        cfg = load_config(name)
        changed = {k for k, v in leaves(cfg).items() if toy.get(k, "unset") != v}
        assert changed - {"run_dir"} and all(k.startswith("understanding.") for k in changed - {"run_dir"}), name
        resolved(cfg["understanding"])  # every option is a real one
    plain_train, plain_backbone = resolved(load_config("toy-no-aids")["understanding"])
    assert plain_train == asdict(UnderstandingTrainConfig(compile="auto", optimizer="muon"))
    assert plain_backbone == asdict(BackboneConfig())
    turns = load_config("toy-relation-turns")["understanding"]
    assert turns["train"]["relation_turns"] and turns["backbone"]["grid_positions"] and turns["train"]["max_steps"] == 700
    assert turns["backbone"]["grid_init"] == "random" and not turns["train"]["count_turns"]
    vqa = load_config("toy-vqa")["understanding"]
    assert vqa["train"] == {**turns["train"], "count_turns": True, "type_loss_every": 25, "optimizer": "muon"}
    assert vqa["backbone"] == turns["backbone"]
    directions = load_config("toy-directions")["understanding"]
    assert directions == {**vqa, "train": {**vqa["train"], "direction_turns": True}}
    grid = load_config("toy-grid-sincos")["understanding"]
    assert grid == {**directions, "backbone": {**directions["backbone"], "grid_init": "sincos", "grid_scale": 0.25}}
    assert resolved(grid) == resolved(load_config("toy")["understanding"])


def test_trainer_flags_override_yaml():
    import argparse

    p = argparse.ArgumentParser()
    add_trainer_arguments(p)
    args = p.parse_args(["--devices", "4", "--num-nodes", "2", "--strategy", "fsdp", "--precision", "bf16-mixed"])
    cfg = apply_trainer_arguments(load_config("full-8b"), args)
    tc = trainer_config(cfg)
    assert (tc.devices, tc.num_nodes, tc.strategy, tc.accelerator) == (4, 2, "fsdp", "gpu")
    with pytest.raises(ValueError, match="global batch 16 per device x 4 devices x 2 nodes"):
        check_global_batch(tc, 16)
    with pytest.raises(ValueError, match="unknown trainer.strategy"):
        apply_trainer_arguments({}, p.parse_args(["--strategy", "horovod"]))


def test_every_stage_takes_its_trainer_from_the_trainer_section(monkeypatch):
    """Devices, nodes, strategy, precision: the trainer: section for every stage; without one
    (the toy) each stage keeps its recipe's precision on one device, as before."""
    from blip3o_mini.config import build
    from blip3o_mini.training import distributed, understanding
    from blip3o_mini.training.distributed import TrainerConfig, stage_trainer_config

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: True)

    tc = stage_trainer_config({"trainer": {"devices": 2, "num_nodes": 3, "strategy": "ddp"}}, "bf16-mixed")
    assert (tc.devices, tc.num_nodes, tc.strategy, tc.precision) == (2, 3, "ddp", "bf16-mixed")
    assert stage_trainer_config({"trainer": {"precision": "32-true"}}, "bf16-mixed").precision == "32-true"
    assert stage_trainer_config(load_config("toy"), "bf16-mixed") == TrainerConfig(precision="bf16-mixed")
    with pytest.raises(ValueError, match=r"unknown UnderstandingTrainConfig option\(s\) \['devices'\]"):
        build(understanding.UnderstandingTrainConfig, {"devices": 2})  # no stage keeps its own devices


def test_bf16_recipes_run_in_fp32_on_a_cpu_without_bf16(monkeypatch, capsys):
    """There bf16 is emulated (2.9x slower CLIP steps): the recipe's bf16 becomes fp32 with a
    printed line, unless the trainer: section asks for bf16 or the job runs on GPUs."""
    from blip3o_mini.training import distributed
    from blip3o_mini.training.distributed import stage_trainer_config

    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: False)
    assert stage_trainer_config(load_config("toy"), "bf16-mixed").precision == "32-true"
    assert "bf16-mixed asked, 32-true used" in capsys.readouterr().out
    assert stage_trainer_config({"trainer": {"precision": "bf16-mixed"}}, "32-true").precision == "bf16-mixed"
    assert stage_trainer_config({"trainer": {"accelerator": "gpu"}}, "bf16-mixed").precision == "bf16-mixed"
    assert stage_trainer_config({}, "32-true").precision == "32-true"
    monkeypatch.setattr(distributed, "cpu_has_bf16", lambda: True)
    assert stage_trainer_config({"trainer": {"accelerator": "cpu"}}, "bf16-mixed").precision == "bf16-mixed"


# ------------------------------------------------------------------------------ describe
@pytest.fixture(scope="module")
def desc8b():
    from blip3o_mini.describe import describe

    return describe(load_config("full-8b"), "full-8b")


def test_describe_full_8b_matches_blip3o(desc8b):
    assert desc8b["dit"].total == pytest.approx(1.4e9, rel=0.05)
    assert desc8b["backbone"].total == pytest.approx(8.29e9, rel=0.05)  # Qwen2.5-VL-7B incl. vision
    assert desc8b["queries"].total == 64 * 3584
    assert desc8b["clip"].total == pytest.approx(4.35e9, rel=0.02)  # EVA02-E-14-plus vision tower
    assert desc8b.trainable == desc8b["dit"].total + desc8b["queries"].total
    assert desc8b["backbone"].trainable == 0 and desc8b.total == sum(c.total for c in desc8b.components)


def nextdit_params(D, depth, H, F_in, K, ffn, C):
    """NextDiT's parameters from its widths, layer by layer (dit.py)."""
    block = (C * 4 * D + 4 * D  # adaLN modulation: SiLU, Linear(C, 4D)
             + 4 * D + D  # four sandwich RMSNorms + the condition RMSNorm
             + 3 * D * D + 2 * 2 * D  # fused qkv + qk LayerNorms
             + D * D + 2 * D * D + 2 * 2 * D + H  # cross q, kv, their LayerNorms, tanh gates
             + D * D + 3 * D * ffn)  # shared output projection, SwiGLU
    embed = (F_in * D + D) + (K * D + D + D * D + D)  # x_embed, caption projection
    time = (256 * C + C + C * C + C) + (2 * D + D * C + C)  # t MLP, pooled-Q LayerNorm + Linear
    final = (C * D + D) + (D * F_in + F_in)
    return embed + time + depth * block + final


def test_dit_count_by_hand(desc8b):
    assert nextdit_params(1792, 24, 28, 1792, 3584, 4864, 1024) == desc8b["dit"].total


def test_describe_cli_json_and_memory(capsys, desc8b):
    from blip3o_mini.sizing import memory_estimate, train_flops_per_sample

    assert cli.main(["describe", "full-4b", "--json", "--memory", "--gpus", "1", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["components"]["backbone"]["total"] == pytest.approx(3.75e9, rel=0.02)  # Qwen2.5-VL-3B
    assert out["components"]["dit"]["trainable"] == pytest.approx(1.4e9, rel=0.05)
    mem = {(m["strategy"], m["num_gpus"]): m for m in out["memory_gib"]}
    assert mem[("deepspeed_stage_1", 32)]["optimizer"] == pytest.approx(mem[("ddp", 32)]["optimizer"] / 32, rel=1e-3)
    assert mem[("fsdp", 32)]["total"] < mem[("deepspeed_stage_1", 32)]["total"] < mem[("ddp", 32)]["total"]
    assert mem[("ddp", 1)] | {"strategy": "fsdp"} == mem[("fsdp", 1)]  # nothing to shard on 1 GPU
    ddp = memory_estimate(desc8b, "ddp", 8, 16)
    assert ddp.optimizer == 12 * desc8b.trainable and ddp.weights == 2 * desc8b.trainable + 2 * desc8b["backbone"].total
    flops = train_flops_per_sample(desc8b)
    assert flops["dit"] > 6 * desc8b["dit"].total * 64 and flops["clip"] == 0
    assert train_flops_per_sample(desc8b, targets="images")["clip"] == 2 * desc8b["clip"].total * 1025
    assert cli.main(["describe", "no-such-config"]) == 2


# ------------------------------------------------------------------------------ extraction
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The fixture shard's 8 samples re-split into 3 shards (3 + 3 + 2)."""
    from blip3o_mini.data.webdataset import read_shards, write_shard

    samples = read_shards(str(FIXTURE))
    d = tmp_path_factory.mktemp("shards")
    for k, part in enumerate((samples[:3], samples[3:6], samples[6:])):
        write_shard(d / f"train-{k:06d}.tar", [{"key": s["key"], "image": s["image"], "caption": s["caption"]}
                                               for s in part])
    return d, samples


@pytest.fixture(scope="module")
def toy_encoder():
    from blip3o_mini.vision import ClipConfig, ClipEncoder

    torch.manual_seed(0)
    return ClipEncoder(ClipConfig())  # the toy open_clip architecture, random weights


def test_extraction_two_ranks_disjoint_and_complete(shards, toy_encoder, tmp_path):
    from blip3o_mini.data.webdataset import read_shards
    from blip3o_mini.extract import center_square, check_extraction, load_extracted, run_extraction

    d, samples = shards
    out = tmp_path / "features"
    results = [run_extraction(toy_encoder, str(d / "*.tar"), out, rank=r, world_size=2, batch_size=2)
               for r in range(2)]  # two "ranks", one after the other
    mine = [{Path(x.shard).name for x in res} for res in results]
    assert mine == [{"train-000000.tar", "train-000002.tar"}, {"train-000001.tar"}]
    assert check_extraction(str(d / "*.tar"), out) == {"train-000000.safetensors": 3,
                                                       "train-000001.safetensors": 3, "train-000002.safetensors": 2}
    keys, caps, feats = zip(*(load_extracted(p) for p in sorted(out.glob("*.safetensors"))))
    assert [k for ks in keys for k in ks] == [s["key"] for s in samples]
    assert [c for cs in caps for c in cs] == [s["caption"] for s in samples]
    written = read_shards(str(d / "*.tar"))  # JPEG re-encoded by write_shard
    images = torch.stack([center_square(s["image"], 64) for s in written])
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(feats), toy_encoder.encode_tokens(images), atol=1e-5, rtol=1e-4)
    again = run_extraction(toy_encoder, str(d / "*.tar"), out, rank=1, world_size=2)
    assert [r.reused for r in again] == [True]  # a re-run skips finished shards
    (out / "train-000001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 shard"):
        check_extraction(str(d / "*.tar"), out)


# ------------------------------------------------------------------------------ one training step per config
def one_step(cfg, backbone, dataset, feature_dim, encoder=None):
    from blip3o_mini.training.generation_run import generation_run

    run = generation_run(cfg, backbone, dataset, feature_dim, encoder=encoder)
    before = {k: v.clone() for k, v in run.module.generator.state_dict().items()}
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    run.fit(fast_dev_run=True, enable_checkpointing=False)
    after = run.module.generator.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step trained
    assert all(torch.equal(frozen[k], v) for k, v in backbone.state_dict().items())
    return run


@pytest.mark.parametrize("name", ["toy", "small"])
def test_fast_dev_run_configs_trained_here(name):
    """toy and small have no pretrained weights: random components are what their stages start from."""
    from blip3o_mini.describe import build_backbone, build_clip_tower
    from blip3o_mini.training.generation import CaptionFeatureDataset

    cfg = load_config(name)
    cfg["trainer"] = {**cfg.get("trainer", {}), "accelerator": "cpu"}
    gen = cfg.setdefault("generation", {})
    gen["train"] = {**gen.get("train", {}), "batch_size": 2, "compile": False}  # tests/test_compile.py compiles
    _, width = build_clip_tower(cfg, "cpu")
    backbone = build_backbone(cfg, width, "cpu")[0].eval()
    data = CaptionFeatureDataset([["a red circle"], ["two blue squares"]] * 2, torch.randn(4, 64, width))
    one_step(cfg, backbone, data, width)


def tiny_full(name: str, targets: str) -> dict:
    """A full config with tiny components of the same classes, on one CPU process."""
    cfg = copy.deepcopy(load_config(name))
    cfg["data"]["targets"] = targets
    cfg["generation"]["dit"] |= {"dim": 64, "depth": 2, "num_heads": 2, "multiple_of": 16}
    cfg["generation"]["train"] |= {"batch_size": 2}
    cfg["trainer"] |= {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto",
                       "global_batch_size": None}
    return cfg


@pytest.fixture(scope="module")
def tiny_qwen(shards):
    from blip3o_mini.qwen_vl import tiny_qwen_vl
    from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts

    rows = [s["json"] for s in shards[1]]
    return tiny_qwen_vl(build_tokenizer(shapesworld_texts(rows), "qwen2_5_vl")).freeze()


@pytest.mark.parametrize("name, targets", [("full-8b", "features"), ("full-4b", "images")])
def test_full_configs_one_step_with_tiny_components(name, targets, shards, tiny_qwen, tmp_path):
    """Tar shards -> (extracted features | images) -> Qwen2.5-VL + EVA02-style CLIP + NextDiT,
    bf16-mixed, gradient checkpointing: one step through generation_run, as the full run."""
    from blip3o_mini.clip_models import TINY_EVA_MODEL
    from blip3o_mini.extract import center_square, run_extraction
    from blip3o_mini.targets import ImageTargetsModule, ShardFeatureDataset
    from blip3o_mini.vision import ClipConfig, ClipEncoder

    cfg = tiny_full(name, targets)
    torch.manual_seed(0)
    encoder = ClipEncoder(ClipConfig(model_name=TINY_EVA_MODEL, image_size=224))  # 16x16 -> 8x8
    d, samples = shards
    if targets == "features":
        run_extraction(encoder, str(d / "*.tar"), tmp_path, rank=0, world_size=1)
        data = ShardFeatureDataset(tmp_path)
        assert len(data) == 8 and data[0][1].shape == (64, encoder.feature_dim)
    else:
        data = [(s["caption"], center_square(s["image"], 224)) for s in samples]
    run = one_step(cfg, tiny_qwen, data, encoder.feature_dim, encoder=encoder)
    assert isinstance(run.module, ImageTargetsModule) == (targets == "images")
    assert run.module.generator.dit_cfg.gradient_checkpointing and run.trainer_kwargs["precision"] == "bf16-mixed"


def test_bench_full_step_refuses_cpu_at_full_size_and_runs_tiny(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_full_step

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            bench_full_step.main(["--size", "full"])
    bench_full_step.main(["--size", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                          "--prompt-tokens", "40"])
    out = json.loads(capsys.readouterr().out)
    assert out["samples_per_s"] > 0 and out["seq_len"] >= 64 + 30 and out["model_tflops_per_sample"] > 0
    assert out["reference_official_4b_samples_per_s_per_gpu"] == 2.78


# ------------------------------------------------------------------------------ DDP
def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_script", ROOT / "tests" / "ddp_script.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ddp_two_processes_match_one_and_resume_continues(ddp_job):
    from blip3o_mini.artifacts import load_tensors

    script = load_script()
    single = script.make_run(1, 6)  # one process, the same global batch of 4
    single.fit(enable_checkpointing=False)
    out, proc = ddp_job
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2 and result["global_batch_size"] == 4
    ddp_losses = [loss for _, loss in result["losses_full"]]
    assert ddp_losses == pytest.approx([loss for _, loss in single.module.losses], rel=1e-4)
    ddp_w, one_w = load_tensors(out / "full.safetensors"), script.weights(single.module)
    for k in one_w:
        torch.testing.assert_close(ddp_w[k], one_w[k], atol=1e-4, rtol=1e-4)
    # resumed from the step-3 checkpoint (mid-epoch: 4 steps per epoch): the same curve and weights
    assert [s for s, _ in result["losses_resumed"]] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in result["losses_resumed"]] == pytest.approx(ddp_losses, rel=1e-5)
    resumed = load_tensors(out / "resumed.safetensors")
    for k in resumed:
        torch.testing.assert_close(resumed[k], ddp_w[k], atol=1e-5, rtol=1e-5)
