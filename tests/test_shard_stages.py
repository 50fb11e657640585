"""A full config's pipeline on WebDataset shards, offline, in seconds: `base: full-4b` with tiny
random components of the full run's classes (an open_clip EVA02 tower given as `pretrained`
safetensors, a Qwen2.5-VL checkpoint directory), tar shards written here, and `blip3o-mini
extract` + `blip3o-mini run` exactly as scripts/launch/ calls them."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from blip3o_mini import cli
from blip3o_mini.config import load_config
from blip3o_mini.run import ensure_stage, selected_stages

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "data" / "fixtures" / "shapesworld-sample-000000.tar"
FULL_STAGES = ["data", "clip", "understanding", "generation"]  # + instruct when instruct_shards is set


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: a second thread only adds contention
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two shards of 4 ShapesWorld samples, a tiny EVA02 tower and a tiny Qwen2.5-VL on disk."""
    from blip3o_mini.artifacts import save_tensors
    from blip3o_mini.clip_models import TINY_EVA_MODEL
    from blip3o_mini.data.webdataset import read_shards, write_shard
    from blip3o_mini.qwen_vl import tiny_qwen_vl
    from blip3o_mini.tokenizer import build_tokenizer, shapesworld_texts
    from blip3o_mini.vision import ClipConfig, ClipEncoder

    root = tmp_path_factory.mktemp("full")
    samples = read_shards(str(FIXTURE))
    for k, part in enumerate((samples[:4], samples[4:])):
        write_shard(root / "shards" / f"train-{k:06d}.tar",
                    [{"key": s["key"], "image": s["image"], "caption": s["caption"]} for s in part])
    # instruct shards: same file names as the pretraining ones (as two hub datasets may have), so
    # their targets must live apart (FEATURES/instruct); prompts phrased as instructions
    for k, part in enumerate((samples[:3], samples[3:6])):
        write_shard(root / "instruct" / f"train-{k:06d}.tar",
                    [{"key": s["key"], "image": s["image"], "caption": f"Please generate an image: {s['caption']}"}
                     for s in part])
    torch.manual_seed(0)
    eva = ClipEncoder(ClipConfig(model_name=TINY_EVA_MODEL, image_size=224))  # 16x16 tokens -> 8x8
    save_tensors(root / "eva.safetensors", eva.model.state_dict())
    qwen = tiny_qwen_vl(build_tokenizer(shapesworld_texts([s["json"] for s in samples]), "qwen2_5_vl"))
    qwen.model.save_pretrained(root / "qwen")  # a checkpoint directory, as the hub's
    qwen.processor.save_pretrained(root / "qwen")
    return root, eva


def tiny_config(root: Path, targets: str, instruct: str | None = None, **clip) -> Path:
    """full-4b with the tiny parts swapped in, on one CPU process, 3 steps; `instruct`: a shard
    pattern for the instruct stage (2 steps), else no instruction tuning."""
    from blip3o_mini.clip_models import TINY_EVA_MODEL

    cfg = {"base": "full-4b",
           "stages": FULL_STAGES + ["instruct"] * bool(instruct),
           "data": {"shards": [str(root / "shards" / "*.tar")], "targets": targets,
                    "features_dir": str(root / "features"), "instruct_shards": instruct},
           "instruct": {"train": {"max_steps": 2, "warmup_steps": 1, "lr": 1e-3}},
           "clip": {"model_name": TINY_EVA_MODEL, "pretrained": str(root / "eva.safetensors"), "image_size": 224,
                    **clip},
           "understanding": {"pretrained": str(root / "qwen")},
           "generation": {"dit": {"dim": 64, "depth": 2, "num_heads": 2, "multiple_of": 16},
                          "train": {"batch_size": 2, "max_steps": 3, "warmup_steps": 1, "checkpoint_every": 2}},
           "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto",
                       "global_batch_size": None}}
    path = root / f"tiny-{targets}-{len(clip)}-{bool(instruct)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "metrics.json").read_text())


def test_features_run_needs_extraction_then_trains_from_it(parts, capsys):
    from blip3o_mini.generation_stage import load_generator
    from blip3o_mini.shard_stages import ShardTargets, measure_target_stats, shard_targets
    from blip3o_mini.targets import ShardImageStream

    root, eva = parts
    config, out = tiny_config(root, "features"), root / "run-features"
    assert cli.main(["run", "--config", str(config), "--out", str(out)]) == 2  # nothing extracted yet
    assert "blip3o-mini extract" in capsys.readouterr().err
    assert cli.main(["extract", "--shards", str(root / "shards" / "*.tar"), "--out", str(root / "features"),
                     "--config", str(config), "--check"]) == 0
    assert cli.main(["run", "--config", str(config), "--out", str(out)]) == 0

    index = json.loads((out / "data" / "shards.json").read_text())
    assert [i["num_samples"] for i in index] == [4, 4] and not (out / "data" / "shapesworld").exists()
    clip = metrics(out, "clip")
    assert (clip["targets"], clip["num_samples"], clip["num_tokens"]) == ("features", 8, 64)
    assert (clip["feature_dim"], clip["encoder_hash"]) == (eva.feature_dim, eva.weights_hash())
    und = metrics(out, "understanding")
    assert (und["trained"], und["model_type"], und["hidden_size"]) == (False, "qwen2_5_vl", 64)
    assert not (out / "understanding" / "backbone").exists()  # nothing trained, nothing saved
    gen = metrics(out, "generation")
    assert (gen["train_steps"], gen["targets"], gen["num_train_samples"]) == (3, "features", 8)
    assert gen["backbone_unchanged"] and gen["vqa_accuracy_after"] is None and gen["final_loss"] > 0
    generator = load_generator(out / "generation")
    assert (generator.feature_dim, generator.queries.shape, generator.dit_cfg.dim) == (eva.feature_dim, (64, 64), 64)
    report = json.loads((out / "report.json").read_text())
    assert set(report["timings_s"]) == set(FULL_STAGES)  # decoder and evaluation are not full-run stages

    cfg = load_config(config)
    upstream = ensure_stage("generation", cfg, out)
    assert all(r.skipped for r in upstream.values())  # a re-run reuses every stage
    # both target paths give the same targets: extracted files == images through the encoder
    mean, std, (var, _) = measure_target_stats(shard_targets(cfg, out, upstream), whiten=True)
    stream = ShardTargets(ShardImageStream(cfg["data"]["shards"], 224), eva.feature_dim, eva)
    mean_s, std_s, (var_s, _) = measure_target_stats(stream, whiten=True)
    for a, b in [(mean, mean_s), (std, std_s), (var, var_s)]:
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cfg["clip"]["pool_grid"] = 4  # features extracted with another grid are refused
    with pytest.raises(ValueError, match="clip.pool_grid=8 but the config says 4"):
        ensure_stage("clip", cfg, root / "run-other-grid")


def test_instruct_stage_continues_the_generation_stage_on_its_own_shards(parts, capsys):
    from blip3o_mini.generation_stage import load_generator, trained_generator_dir, weights_hash

    root, _ = parts
    config, out = tiny_config(root, "features", str(root / "instruct" / "*.tar")), root / "run-instruct"
    for shards, features in (("shards", root / "features"), ("instruct", root / "features" / "instruct")):
        assert cli.main(["extract", "--shards", str(root / shards / "*.tar"), "--out", str(features),
                         "--config", str(config)]) == 0
    assert cli.main(["run", "--config", str(config), "--out", str(out)]) == 0

    pretrained, tuned = load_generator(out / "generation"), load_generator(out / "instruct")
    m = metrics(out, "instruct")
    assert (m["train_steps"], m["num_train_samples"], m["num_shards"], m["targets"]) == (2, 6, 2, "features")
    assert m["generator_hash_start"] == weights_hash(pretrained)  # it started from stage 2's weights ...
    assert m["generator_hash_after"] == weights_hash(tuned) != weights_hash(pretrained)  # ... and trained
    assert m["backbone_unchanged"] and json.loads((out / "instruct" / "stage.json").read_text())["complete"]
    assert not list((out / "instruct").glob("lightning-*"))  # resume state removed once complete
    assert trained_generator_dir(out) == out / "instruct"  # what Blip3oMiniPipeline.from_run samples with
    assert set(json.loads((out / "report.json").read_text())["timings_s"]) == set(FULL_STAGES) | {"instruct"}

    cfg = load_config(config)
    assert all(r.skipped for r in ensure_stage("instruct", cfg, out).values())  # a re-run reuses it
    cfg["instruct"]["train"]["max_steps"] = 3  # its own numbers key it; stage 2 stays cached
    results = ensure_stage("instruct", cfg, out)
    assert results["generation"].skipped and not results["instruct"].skipped
    assert results["instruct"].metrics["train_steps"] == 3

    missing = tiny_config(root, "features", str(root / "no-such-dir" / "*.tar"))
    capsys.readouterr()
    assert cli.main(["run", "--config", str(missing), "--out", str(root / "run-missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.instruct_shards: no WebDataset shard matches" in err
    assert not (root / "run-missing" / "data" / "stage.json").exists()  # it failed before any stage ran
    (root / "new").mkdir()
    (root / "new" / "more-000000.tar").write_bytes((root / "instruct" / "train-000000.tar").read_bytes())
    unextracted = tiny_config(root, "features", str(root / "new" / "*.tar"))
    with pytest.raises(FileNotFoundError, match="blip3o-mini extract"):  # its targets were not extracted
        ensure_stage("instruct", load_config(unextracted), out)
    no_instruct = load_config(tiny_config(root, "features"))
    assert [n for n, _ in selected_stages(no_instruct)] == FULL_STAGES
    with pytest.raises(ValueError, match="do not run without data.instruct_shards"):
        ensure_stage("instruct", no_instruct, out)


def test_ddp_two_processes_write_every_artifact_once_on_rank_zero(parts, tmp_path):
    """2 CPU processes (DDP, gloo) through the real pipeline: every rank trains generation and
    instruct, only global rank 0 writes or removes anything, and both return the same results."""
    import subprocess
    import sys

    from blip3o_mini.generation_stage import load_generator

    root, _ = parts
    cfg = yaml.safe_load(tiny_config(root, "features", str(root / "instruct" / "*.tar")).read_text())
    for shards, features in (("shards", root / "features"), ("instruct", root / "features" / "instruct")):
        assert cli.main(["extract", "--shards", str(root / shards / "*.tar"), "--out", str(features),
                         "--config", str(root / "tiny-features-0-True.yaml")]) == 0  # reused when done
    cfg["trainer"] |= {"devices": 2, "strategy": "ddp"}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(cfg))
    out, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_stage_script.py"), str(tmp_path / "ddp.yaml"),
                           str(out), str(logs)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    calls = [json.loads(line) for f in logs.glob("writes-*.jsonl") for line in f.read_text().splitlines()]
    assert {c["rank"] for c in calls} == {0}  # rank 1 wrote and removed nothing
    written = [c["path"] for c in calls if c["kind"] == "write"]
    assert len(written) == len(set(written))  # every file once
    for stage in ("generation", "instruct"):
        assert str(out / stage / "generator.safetensors") in written
        assert str(out / stage / f"lightning-{json.loads((out / stage / 'stage.json').read_text())['key']}") in \
            [c["path"] for c in calls if c["kind"] == "rmtree"]
        assert not list((out / stage).glob("lightning-*")) and not list((out / stage).glob(".*.tmp"))
        load_generator(out / stage)  # complete, loadable files
    results = [json.loads((logs / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["stages"] == results[1]["stages"]  # rank 1 returns rank 0's StageResults
    assert (results[1]["stages"]["generation"]["train_steps"], results[1]["stages"]["instruct"]["train_steps"]) == (3, 2)
    assert results[1]["stages"]["generation"] == metrics(out, "generation")


def test_images_run_encodes_with_the_pretrained_clip_every_step(parts):
    root, eva = parts
    out = root / "run-images"
    assert cli.main(["run", "--config", str(tiny_config(root, "images")), "--out", str(out)]) == 0
    assert metrics(out, "clip")["targets"] == "images" and metrics(out, "clip")["encoder_hash"] == eva.weights_hash()
    gen = metrics(out, "generation")
    assert (gen["train_steps"], gen["targets"], gen["num_train_samples"]) == (3, "images", 8)
    assert gen["backbone_unchanged"]


def test_data_stage_indexes_and_validates_shards(parts, tmp_path, monkeypatch):
    import io
    import tarfile

    from blip3o_mini.shard_stages import index_shard

    root, _ = parts
    cfg = load_config(tiny_config(root, "features")) | {"stages": ["data"]}
    first = ensure_stage("data", cfg, tmp_path / "ok")["data"]
    monkeypatch.setenv("RANK", "1")  # another rank of a launched job reuses rank 0's index
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert ensure_stage("data", cfg, tmp_path / "ok")["data"].skipped and first.metrics["num_samples"] == 8
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    full = (root / "shards" / "train-000000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(full[: len(full) // 2])  # a shard cut mid-way
    cut = index_shard(str(tmp_path / "cut.tar"))
    assert 0 < cut["num_samples"] < 4 and cut["error"]
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:  # an image without its caption
        info = tarfile.TarInfo("scene_7.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    cfg["data"] = cfg["data"] | {"shards": [str(root / "shards" / "*.tar"), str(tmp_path / "bad.tar")]}
    with pytest.raises(ValueError, match="sample 'scene_7' has no caption member 'scene_7.txt'"):
        ensure_stage("data", cfg, tmp_path / "run")


def test_shards_refuse_to_train_toy_components_and_stage_lists_are_checked(parts):
    root, _ = parts
    cfg = load_config(tiny_config(root, "features"))
    cfg["clip"]["pretrained"] = None
    with pytest.raises(ValueError, match="needs a pretrained CLIP encoder"):
        ensure_stage("clip", cfg, root / "run-untrained")
    assert [n for n, _ in selected_stages(load_config("full-8b"))] == FULL_STAGES + ["instruct"]
    assert len(selected_stages(load_config("toy"))) == 6
    with pytest.raises(ValueError, match=r"leave out \['clip', 'data'\]"):
        selected_stages({"stages": ["understanding"]})
    with pytest.raises(ValueError, match="unknown stage"):
        selected_stages({"stages": ["data", "pretraining"]})
