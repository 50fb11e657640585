"""The main job end to end on a tiny configuration: every stage runs, the report has the keys
the README promises, GenEval's folder layout is written, and a re-run reuses every stage."""

import json

import pytest
import torch
import yaml

from blip3o_mini.cli import main
from blip3o_mini.config import load_config
from blip3o_mini.pipeline import Blip3oMiniPipeline, SamplingConfig
from blip3o_mini.report import build_report, report_markdown
from blip3o_mini.run import NEEDS, STAGES, ensure_stage, run_config, stages_for

TINY = {
    "base": "toy",
    "data": {"num_train": 64, "num_val": 64},
    "clip": {"train": {"batch_size": 16, "max_steps": 2}},
    "understanding": {"backbone": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                                   "intermediate_size": 128},
                      "train": {"batch_size": 8, "max_steps": 2, "compile": False}, "eval": {"max_scenes": 6}},
    "generation": {"num_query_tokens": 8, "dit": {"dim": 32, "depth": 1, "num_heads": 2, "multiple_of": 16},
                   "cond_norm": "whiten",  # Q whitened with statistics the stage fits, saved and loaded with the weights
                   "flow": {"num_steps": 2},  # compiling would add minutes; tests/test_compile.py covers it
                   "train": {"batch_size": 8, "max_steps": 2, "compile": False}},
    "decoder": {"block_out_channels": [8, 16], "cross_attention_dim": 16, "attention_head_dim": 8,
                "norm_num_groups": 4, "train": {"batch_size": 8, "max_steps": 2, "compile": False},
                "eval": {"num_images": 6, "num_inference_steps": 2}},
    "evaluation": {"prompts_per_tag": 1},  # samples with generation.flow and decoder.eval's 2 steps
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert main(["run", "--config", str(cfg_path), "--out", str(root / "out")]) == 0
    return cfg_path, root / "out"


def test_every_stage_writes_its_artifact(tiny_run):
    _, out = tiny_run
    ran = [n for n, _ in stages_for(TINY)]
    assert ran == [n for n, _ in STAGES if n != "instruct"]  # instruct needs data.instruct_shards
    for name in ran:
        assert json.loads((out / name / "stage.json").read_text())["complete"] is True
    assert not (out / "instruct").exists()
    assert (out / "evaluation" / "geneval" / "00000" / "metadata.jsonl").exists()
    assert (out / "evaluation" / "geneval" / "00000" / "samples" / "0000.png").exists()
    assert (out / "evaluation" / "grid.png").exists()
    assert (out / "evaluation" / "pipeline" / "pipeline.json").exists()


def test_report_has_the_promised_keys(tiny_run):
    _, out = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert {"overall", "seen", "unseen", "single_object", "position"} <= set(report["geneval_mini"])
    assert "reconstruction_geneval_mini" in report
    assert set(report["clip"]) == {"zero_shot_color_acc", "zero_shot_shape_acc", "zero_shot_color_acc_unseen",
                                   "zero_shot_shape_acc_unseen", "recall_at_1"}
    # Understanding is preserved exactly: the frozen backbone answers as before stage 2.
    assert report["vqa"]["accuracy_after"] == report["vqa"]["accuracy_before"]
    assert report["vqa"]["backbone_unchanged"] is True
    assert set(report["timings_s"]) == {n for n, _ in stages_for(TINY)} and report["total_s"] > 0
    # the precision each stage trained in: a recipe's bf16 is fp32 on a CPU without bf16 instructions
    assert all(report["stages"][s]["train_precision"] in ("32-true", "bf16-mixed")
               for s in ("clip", "understanding", "generation", "decoder"))
    # and whether its model was compiled (`compile:`; TINY sets false, test_compile.py compiles)
    assert all(report["stages"][s]["train_compiled"] is False for s in ("understanding", "generation", "decoder"))
    assert "GenEval-mini" in (out / "report.md").read_text()


def test_rerun_reuses_every_stage(tiny_run):
    cfg_path, out = tiny_run
    results = ensure_stage("evaluation", load_config(cfg_path), out)
    assert all(r.skipped for r in results.values())
    decoder_only = ensure_stage("decoder", load_config(cfg_path), out)
    assert set(decoder_only) == set(NEEDS["decoder"]) | {"decoder"}


def test_run_dir_records_its_config(tiny_run, tmp_path):
    cfg_path, out = tiny_run
    # a notebook pointed at this run directory asks for the same stages and reuses them
    recorded = run_config(out)
    assert recorded.pop("trainer") == {}  # the CLI's trainer flags (none given) are recorded too
    assert recorded == load_config(cfg_path)
    assert all(r.skipped for r in ensure_stage("evaluation", run_config(out), out).values())
    assert run_config(tmp_path) == load_config("toy")  # no recorded config: the default


def test_generate_command_writes_a_png(tiny_run, tmp_path, monkeypatch):
    _, out = tiny_run
    png = tmp_path / "x.png"
    assert main(["generate", "a photo of a red circle", "-o", str(png), "--run-dir", str(out), "--steps", "2"]) == 0
    from PIL import Image

    assert Image.open(png).size == (64, 64)
    assert main(["generate", "  ", "-o", str(png), "--run-dir", str(out)]) == 2  # one-line error
    # Without --run-dir it reads $BLIP3O_MINI_RUN_DIR, as `blip3o-mini answer` and the notebooks do.
    monkeypatch.setenv("BLIP3O_MINI_RUN_DIR", str(out))
    png.unlink()
    assert main(["generate", "a photo of a red circle", "-o", str(png), "--steps", "2"]) == 0
    assert png.exists()


def test_dit_lr_ablation_script_trains_fresh_dits_on_the_runs_q(tiny_run, monkeypatch, capsys):
    """scripts/ablate_dit_lr.py (the README's learning-rate figures) on a finished run."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "ablate_dit_lr.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--lrs", "1e-3", "3e-3",
                                      "--steps", "2", "--eval-every", "1", "--batch-size", "4",
                                      "--precision", "32-true", "bf16-mixed"])
    runpy.run_path(str(script), run_name="__main__")
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["32-true"], ["bf16-mixed"])]
    assert [(r[0], float(r[1]), int(r[2]), int(r[3])) for r in rows] == [
        (p, lr, 1, s) for p in ("32-true", "bf16-mixed") for lr in (1e-3, 3e-3) for s in (1, 2)]
    own, null = float(rows[-1][4]), float(rows[-1][5])
    assert 0 < own < 100 and 0 < null < 100


def test_dit_geneval_ablation_script_scores_fresh_dits_and_their_emas(tiny_run, monkeypatch, capsys, tmp_path):
    """scripts/ablate_dit_geneval.py (the README's steps / EMA / gate figures) on a finished run:
    one score per weights and step, Q cached to safetensors and read back the second time, and
    computed again when the cache was made with other queries (its key differs)."""
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.artifacts import load_tensors, save_tensors

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "ablate_dit_geneval.py"
    cache, saved = tmp_path / "q.safetensors", tmp_path / "dit.safetensors"
    # second pass: Q read back, another feature scale (8 whitened coordinates), depth, time shift and optimizer
    for extra in ([], ["--feature-norm", "whiten", "--whiten-dims", "8", "--whiten-power", "0.25", "--time-shift", "2",
                       "--dit-depth", "2", "--optimizer", "muon", "--save", str(saved), "--images", str(tmp_path / "kept"),
                       "--contrastive", "0.5", "--contrastive-times", "0", "0.5", "--relation-share", "0.5"]):
        monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--steps", "2", "--score-at", "1",
                                          "--decays", "0.9", "--batch-size", "4", "--cross-gate-init", "0.5",
                                          "--q-cache", str(cache)] + extra)
        runpy.run_path(str(script), run_name="__main__")
        printed = capsys.readouterr().out.strip().splitlines()
        assert any(("read from the cache" if extra else "computed") in line for line in printed)
        assert any(line.startswith("negatives: ") for line in printed) == bool(extra)  # --contrastive's
        assert any(line.startswith("batches of 2 of the ") for line in printed) == bool(extra)  # --relation-share
        scores = json.loads(printed[-1])
        assert sorted(scores) == ["ema 0.9 @ 1", "ema 0.9 @ 2", "raw @ 1", "raw @ 2"]
        assert all(0.0 <= v <= 1.0 for v in scores.values())
        assert sum("FVU by direction at t 0.5" in line for line in printed) == 4  # one per scored weights
    assert (tmp_path / "kept" / "raw_2" / "00000" / "metadata.jsonl").exists()  # --images keeps GenEval's layout
    save_tensors(cache, load_tensors(cache), metadata={"key": "other queries"})  # a stale cache
    runpy.run_path(str(script), run_name="__main__")  # the second pass's arguments again
    assert "computed" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", sys.argv + ["--cond-norm", "standardize"])  # Q scaled another way
    runpy.run_path(str(script), run_name="__main__")
    assert "read from the cache" in capsys.readouterr().out  # it holds Q before cond_norm, so serves any
    monkeypatch.setattr(sys, "argv", sys.argv + ["--relation-share", "1.5"])
    with pytest.raises(SystemExit, match=r"a share of the batch, in \[0, 1\]"):
        runpy.run_path(str(script), run_name="__main__")
    # --relation-share draws its share of a batch from exactly the captions that state the relation
    # of a two-object scene, the rest from the others
    import datasets

    from blip3o_mini.data import relation, scene_of

    ns = runpy.run_path(str(script))
    train = datasets.load_from_disk(str(out / "data" / "shapesworld"))["train"]
    kept = ns["relation_captions"](train).tolist()
    first, second = torch.tensor([0, 1]), torch.tensor([5, 6, 7])
    batch = ns["draw_batch"](8, 8, (first, second, 3))
    assert batch[:3].lt(2).all() and batch[3:].ge(5).all() and ns["draw_batch"](8, 8, (first, second, 0)).ge(5).all()
    assert ns["draw_batch"](8, 100, None).max() < 8
    pairs = [(scene_of(r), text) for r in train for text in r["captions"]]
    assert len(kept) == len(pairs) and 0 < sum(kept) < len(kept)
    for keep, (scene, text) in zip(kept, pairs):
        states = len(scene.objects) == 2 and relation(*scene.objects) is not None and any(
            w in text for w in ("left of", "right of", "above", "below"))
        assert keep == states, text
    weights = load_tensors(saved)
    assert weights["x_embed.weight"].shape[1] == 8 and "blocks.1.qkv.weight" in weights  # 8 coordinates, 2 blocks


def test_relation_ablation_script(tiny_run, monkeypatch, capsys):
    """scripts/ablate_relation.py (the README's relation figures): relation turns alone, with grid
    positions and single-object position turns, scored on the run's validation scenes."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "ablate_relation.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--steps", "2", "--grid-positions",
                                      "--where", "--threads", "1"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "grid positions True, where turns True" in printed and "trained 2 steps" in printed
    assert "relation accuracy:" in printed and "position turns:" in printed


def test_type_loss_curves_script(tmp_path, monkeypatch, capsys):
    """scripts/type_loss_curves.py reads each run's type_loss_history.json and finds where the
    relation loss first falls below half of chance."""
    import runpy
    import sys
    from pathlib import Path

    for name, curve in (("learns", [[0, 0.4], [25, 0.35], [50, 0.05]]), ("flat", [[0, 0.4], [25, 0.35], [50, 0.34]])):
        (tmp_path / name / "understanding").mkdir(parents=True)
        (tmp_path / name / "understanding" / "type_loss_history.json").write_text(
            json.dumps({"relation": curve, "color": [[0, 1.0], [50, 0.01]]}))
    script = Path(__file__).parents[1] / "scripts" / "type_loss_curves.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "learns"), str(tmp_path / "flat"),
                                      "--png", str(tmp_path / "curves.png")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "learns: below half of chance from step 50" in printed
    assert "flat: below half of chance from step never" in printed
    assert "  25       0.350       0.350" in printed and (tmp_path / "curves.png").stat().st_size > 0
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path)])
    with pytest.raises(SystemExit, match="type_loss_history.json not found"):
        runpy.run_path(str(script), run_name="__main__")


def test_grid_positions_scale_script(tiny_run, monkeypatch, capsys, tmp_path):
    """scripts/grid_positions_scale.py: the grid tables' scale beside the projected tokens, on a
    run whose backbone has them (sin-cos, near the tokens' scale) and on one without."""
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.backbone import BackboneConfig, ToyBackbone

    _, out = tiny_run
    trained = ToyBackbone.load(out / "understanding" / "backbone")
    for name, grid in (("grid", {"grid_positions": True, "grid_init": "sincos", "grid_scale": 1.0}),
                       ("plain", {"grid_positions": False})):
        (tmp_path / name).mkdir()
        for stage in ("data", "clip"):  # the run's own stages, read only
            (tmp_path / name / stage).symlink_to(out / stage)
        cfg = BackboneConfig(**(vars(trained.cfg) | grid))
        ToyBackbone(cfg, trained.tokenizer).save(tmp_path / name / "understanding" / "backbone")
    script = Path(__file__).parents[1] / "scripts" / "grid_positions_scale.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "grid"), str(tmp_path / "plain")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    ratio = float(printed.split("the tokens are ")[1].split("x louder")[0])
    assert "grid: projected tokens std" in printed and 0.1 < ratio < 10  # unit sin-cos: the tokens' scale
    assert "plain: no grid positions" in printed


def test_direction_probe_script(tiny_run, monkeypatch, capsys):
    """scripts/direction_probe.py (the README's direction figures): the backbone's answers to
    direction, position and relation turns beside the one-object and both-halves guesses."""
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.data.dataset import scene_of

    script = Path(__file__).parents[1] / "scripts" / "direction_probe.py"
    guesses = runpy.run_path(str(script))["one_object_guesses"]
    objects = [{"shape": "circle", "color": "red", "bbox": [4, 4, 16, 16]},  # centre (10, 10)
               {"shape": "square", "color": "blue", "bbox": [20, 40, 30, 50]}]  # centre (25, 45): both left of 32
    turns = [("where is the blue square from the red circle?", "right"),
             ("where is the red circle from the blue square?", "left")]
    one, both = guesses(scene_of({"objects": objects}), turns)
    assert one == ["left", "left"]  # the first-named object's half: wrong for the square, right for the circle
    assert both == ["below", "above"]  # same horizontal half, so the vertical halves decide: wrong for both
    _, out = tiny_run
    monkeypatch.setattr(sys, "argv", [str(script), str(out), "--scenes", "40"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out.name}: direction ") and "one object's half" in printed
    scores = [float(printed.split(f"{k} ")[1][:5]) for k in ("direction", "position", "relation")]
    assert all(0 <= v <= 1 for v in scores)


def test_sdedit_script_scores_tokens_finished_from_each_start(tiny_run, monkeypatch, capsys):
    """scripts/sdedit_geneval.py (the README's scores by noise level)."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "sdedit_geneval.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--starts", "1", "0.5", "0",
                                      "--num-images", "4", "--batch-size", "3"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()
    scores = json.loads(printed[-1])
    assert sorted(scores) == ["0.0", "0.5", "1.0"] and all(0.0 <= v <= 1.0 for v in scores.values())
    assert printed[-4].startswith("from t0 = 1.00: GenEval-mini of the scene prompt")


def test_reconstruct_top_directions_script(tiny_run, monkeypatch, capsys):
    """scripts/reconstruct_top_directions.py (the README's ceiling per number of directions)."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "reconstruct_top_directions.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--dims", "2", "128"])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()
    scores = json.loads(printed[-1])
    assert sorted(scores) == ["128", "2"] and all(0.0 <= v <= 1.0 for v in scores.values())
    assert "top 128 of 128 directions (1.000 of the variance)" in printed[-2]
    assert "objects found in their colour and shape: circle " in printed[-2]


def test_token_norms_script(tiny_run, monkeypatch, capsys):
    """scripts/token_norms.py (the README's blank single-object images against real tokens)."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "token_norms.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--tags", "single_object", "--seeds", "1"])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = results["single_object"]
    assert row["images"] == 54 and 0.0 <= row["blank"] <= 1.0 and row["norm"] > 0
    assert results["real"] and all(v > 0 for v in results["real"].values())
    probe = results["probe"]
    assert 0.0 <= probe["accuracy"] <= probe["object_vs_background"] <= 1.0
    assert set(probe["real_object_tokens"]) == set(results["real"])


def test_token_norms_patch_labels():
    """The probe's labels: a square filling the 8x8 patches at grid rows 1-2, columns 4-5 labels
    exactly those 4 tokens with its colour (palette index + 1); the rest are background."""
    import runpy
    from pathlib import Path

    from blip3o_mini.data.world import COLORS, Obj, Scene, render

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "token_norms.py"))
    image = render(Scene((Obj("square", "blue", (32, 8, 48, 24)),)))
    labels = script["patch_labels"]([image])[0].reshape(8, 8)  # (8, 8) grid rows x columns
    expected = torch.zeros(8, 8, dtype=labels.dtype)
    expected[1:3, 4:6] = COLORS.index("blue") + 1
    assert torch.equal(labels, expected)


def test_ablate_decoder_tokens_script(tiny_run, monkeypatch, capsys):
    """scripts/ablate_decoder_tokens.py (the README's decoder and noise-temperature figures): at the
    config's own decoder numbers and temperature 1 it reproduces the evaluation stage's score."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    s = SamplingConfig.from_config(run_config(out))
    own = f"1:{s.decoder_guidance_scale}:{s.decoder_steps}"
    script = Path(__file__).parents[1] / "scripts" / "ablate_decoder_tokens.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--variants", own, "0.5:1:2",
                                      "--finetune-noise", "0.5", "--finetune-steps", "2"])
    runpy.run_path(str(script), run_name="__main__")
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sorted(scores) == sorted([own, "0.5:1:2", "decoder fine-tuned, token noise 0.5"])
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    stage = json.loads((out / "evaluation" / "metrics.json").read_text())["geneval_mini"]["overall"]
    assert scores[own] == round(stage, 4)


def test_sampling_sweep_script(tiny_run, monkeypatch, capsys):
    """scripts/sampling_sweep.py (docs/status.md's guidance-interval and seed-spread figures): the
    run's own numbers with the evaluation's seed reproduce the evaluation stage's score; an unknown
    setting is a one-line error naming the settings there are."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "sampling_sweep.py"
    variants = ["run", "guidance_interval=0.5:1,num_inference_steps=3"]
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--variants", *variants, "--seeds", "0"])
    runpy.run_path(str(script), run_name="__main__")
    rows = capsys.readouterr().out.strip().splitlines()
    assert [r.split(": GenEval-mini")[0] for r in rows] == [f"seed 0  {v}" for v in variants]
    stage = json.loads((out / "evaluation" / "metrics.json").read_text())["geneval_mini"]
    assert f"GenEval-mini {stage['overall']:.3f}  seen prompts {stage['overall_seen']:.3f} " in rows[0]
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--variants", "cfg=3"])
    with pytest.raises(SystemExit, match="unknown sampling setting 'cfg' in 'cfg=3'; choose from num_inference_steps"):
        runpy.run_path(str(script), run_name="__main__")


def test_relation_seeds_script(tiny_run, monkeypatch, capsys):
    """scripts/relation_seeds.py (docs/status.md): seed 0 regenerates the evaluation's own
    position images (their GenEval accuracy is the stage's), and the pooled counts add up."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "relation_seeds.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--seeds", "0"])
    module = runpy.run_path(str(script), run_name="__main__")
    rows = capsys.readouterr().out.strip().splitlines()
    stage = json.loads((out / "evaluation" / "metrics.json").read_text())["geneval_mini"]
    assert rows[0].startswith(f"seed 0: position {stage['position']:.3f} (")
    both = int(rows[0].split("both colours ")[1].split(":")[0])
    counts = [int(rows[1].split(f"{k} ")[1].split(",")[0].split(";")[0]) for k in ("asked", "opposite", "neither")]
    assert sum(counts) == both and rows[1].startswith("pooled over 1 seeds, all:")
    sign_test = module["sign_test"]
    assert sign_test(0, 0) == 1.0 and sign_test(5, 10) == 1.0
    assert sign_test(10, 10) == pytest.approx(2 / 1024) and sign_test(0, 10) == sign_test(10, 10)


def test_sampling_settings_rerun_the_evaluation_not_the_training(tiny_run):
    """generation.flow's num_steps / guidance_scale / guidance_interval / sde_noise are read when sampling only:
    changing them keeps the trained generator and re-runs the evaluation with the new numbers
    (last in this file: it replaces the tiny run's evaluation)."""
    _, out = tiny_run
    cfg = run_config(out)
    cfg["generation"]["flow"].update(guidance_scale=1.0, sde_noise=0.5, guidance_interval=[0.2, 1.0])
    results = ensure_stage("evaluation", cfg, out)
    assert results["generation"].skipped and results["decoder"].skipped
    assert not results["evaluation"].skipped
    sampling = results["evaluation"].metrics["sampling"]
    assert (sampling["guidance_scale"], sampling["sde_noise"], list(sampling["guidance_interval"])) == (1.0, 0.5, [0.2, 1.0])
    pipe = Blip3oMiniPipeline.from_pretrained(results["evaluation"].path / "pipeline")
    assert pipe.sampling.sde_noise == 0.5  # the saved pipeline samples as the evaluation did
    assert pipe.sampling.guidance_interval == (0.2, 1.0)
    counts = results["evaluation"].metrics["object_counts"]  # one row per tag, fractions of its images
    assert counts and set(counts) <= set(results["evaluation"].metrics["geneval_mini"])
    assert all(abs(c["fewer"] + c["exact"] + c["more"] - 1) < 1e-9 and c["blank"] <= c["fewer"] for c in counts.values())


def test_shape_given_colour_script(tmp_path, monkeypatch, capsys):
    """scripts/shape_given_colour.py: right colour with the asked shape on reference renders; a
    square drawn as a circle of the asked colour counts as colour drawn, shape wrong."""
    import runpy
    import sys
    from pathlib import Path

    import numpy as np

    from blip3o_mini.data.world import place_objects, render
    from blip3o_mini.evaluation.folder import write_geneval_folder
    from blip3o_mini.evaluation.prompts import make_prompts
    from blip3o_mini.evaluation.reference import reference_images

    prompts = [m for m in make_prompts(per_tag=18) if m["tag"] == "colors"]  # 18: one per colour x shape
    write_geneval_folder(tmp_path / "right", prompts, reference_images, samples_per_prompt=1)

    def squares_as_circles(batch, seed):
        kinds = [(m["include"][0]["color"], "circle" if m["include"][0]["class"] == "square" else m["include"][0]["class"])
                 for m in batch]
        return [render(place_objects(np.random.default_rng([seed, k]), [kind])) for k, kind in enumerate(kinds)]

    write_geneval_folder(tmp_path / "run" / "evaluation" / "geneval", prompts, squares_as_circles, samples_per_prompt=1)
    script = Path(__file__).parents[1] / "scripts" / "shape_given_colour.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "right"), str(tmp_path / "run")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    right, run = printed.split("run: per object")
    assert "colors          18         1.00         1.00           1.00" in right
    assert "colors          18         1.00         0.67           0.67" in run  # 6 of 18 asked squares
    assert "asked square: drawn as circle 1.00 (n=6)" in run and "asked circle: drawn as circle 1.00" in run
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path)])
    with pytest.raises(SystemExit, match="neither a run directory"):
        runpy.run_path(str(script), run_name="__main__")


def test_shape_given_colour_relation_between_colours(tmp_path, monkeypatch, capsys):
    """scripts/shape_given_colour.py's position line: reference renders draw every asked relation;
    the same scenes drawn mirrored (each relation replaced by its inverse) draw the opposite."""
    import copy
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.data.text import INVERSE
    from blip3o_mini.evaluation.folder import write_geneval_folder
    from blip3o_mini.evaluation.prompts import make_prompts
    from blip3o_mini.evaluation.reference import reference_images

    prompts = [m for m in make_prompts(per_tag=12) if m["tag"] == "position"]

    def mirrored(batch, seed):
        flipped = copy.deepcopy(batch)
        for m in flipped:
            m["include"][1]["position"][0] = INVERSE[m["include"][1]["position"][0]]
        return reference_images(flipped, seed)

    write_geneval_folder(tmp_path / "right", prompts, reference_images, samples_per_prompt=1)
    write_geneval_folder(tmp_path / "mirrored", prompts, mirrored, samples_per_prompt=1)
    script = Path(__file__).parents[1] / "scripts" / "shape_given_colour.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "right"), str(tmp_path / "mirrored")])
    runpy.run_path(str(script), run_name="__main__")
    right, mirror = capsys.readouterr().out.split("mirrored: per object")
    assert "both colours drawn: 12; the asked relation between them 1.00, the opposite 0.00" in right
    assert "both colours drawn: 12; the asked relation between them 0.00, the opposite 1.00" in mirror
    words = [m["include"][1]["position"][0] for m in prompts]
    first = sum(w in ("left of", "above") for w in words)  # the asked relation draws the first-named object first
    assert f"drawn first (left, or upper): {first / 12:.2f}" in right
    assert f"drawn first (left, or upper): {(12 - first) / 12:.2f}" in mirror
    assert f"left of ({words.count('left of')}) asked 1.00, opposite 0.00" in right
    assert f"right of ({words.count('right of')}) asked 0.00, opposite 1.00" in mirror


def test_same_noise_prompts_script(tiny_run, monkeypatch, capsys):
    """scripts/same_noise_prompts.py: a prompt against itself differs in nothing (same noise,
    same condition); another prompt moves the condition Q."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "same_noise_prompts.py"
    prompts = ["a photo of a red square", "a photo of a red square", "a photo of a blue circle"]
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--num", "3", *prompts])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("'a photo of a red square': detected")
    result = json.loads(printed[-1])
    assert result["a photo of a red square"] == {"tokens": 0.0, "pixels": 0.0, "q": 0.0}
    # another prompt moves Q; the tiny run's DiT, two steps from its zero-initialised gates,
    # barely hears it yet, so only the sign of the token distance is known
    assert result["a photo of a blue circle"]["q"] > 0 and result["a photo of a blue circle"]["tokens"] >= 0
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "a photo of a circle"])
    with pytest.raises(SystemExit, match="two or more prompts"):
        runpy.run_path(str(script), run_name="__main__")


def test_probe_condition_labels_and_control():
    """scripts/probe_condition.py: "A left of B" puts A on the left, "A right of B" puts B there
    (above / below alike); a colour-attribution prompt binds each shape to its colour; the
    probe reads labels that the features hold, and on an unordered bag of words, which cannot
    tell "a red circle left of a blue square" from "a blue square left of a red circle", it
    stays at or below 0.5."""
    import runpy
    from pathlib import Path

    from blip3o_mini.evaluation.prompts import compositions

    script = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "probe_condition.py"))
    position = {m["prompt"]: m for m in compositions("position")}
    label = script["position_labels"]
    assert label(position["a photo of a red circle left of a blue square"]) == {"left": ("red", "circle")}
    assert label(position["a photo of a red circle right of a blue square"]) == {"left": ("blue", "square")}
    assert label(position["a photo of a red circle above a blue square"]) == {"top": ("red", "circle")}
    assert label(position["a photo of a red circle below a blue square"]) == {"top": ("blue", "square")}
    attr = {m["prompt"]: m for m in compositions("color_attr")}
    assert script["attribution_labels"](attr["a photo of a red circle and a blue square"]) == {
        "circle": "red", "square": "blue"}

    metas = [m for m in position.values() if m["include"][1]["position"][0] in ("left of", "right of")]
    colours = [label(m)["left"][0] for m in metas]
    probe = script["cross_validated"]
    classes = sorted(set(colours))
    one_hot = torch.nn.functional.one_hot(torch.tensor([classes.index(c) for c in colours])).float()
    assert probe(one_hot + 0.1 * torch.randn(one_hot.shape), colours) == 1.0
    assert probe(script["bag_of_words"]([m["prompt"] for m in metas]), colours) <= 0.5


def test_probe_condition_script(tiny_run, monkeypatch, capsys):
    """scripts/probe_condition.py on a finished run: one accuracy per label and representation."""
    import runpy
    import sys
    from pathlib import Path

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "probe_condition.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == "900 prompts; held-out accuracy of a linear probe (5-fold cross-validated)"
    results = json.loads(printed[-1])
    assert len(results) == 7 and "position: the left object's colour" in results
    assert all(set(r) == {"Q trained, mean+last", "Q trained, all queries", "Q random, all queries", "bag of words"}
               and all(0.0 <= v <= 1.0 for v in r.values()) for r in results.values())


def test_condition_loudness_script(tiny_run, monkeypatch, capsys):
    """scripts/condition_loudness.py: each position prompt flipped and recoloured, the moves of Q
    raw, standardised and whitened; the run's generator carries the statistics its stage fitted."""
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.evaluation.prompts import compositions
    from blip3o_mini.generation_stage import load_generator

    _, out = tiny_run
    gen = load_generator(out / "generation")
    assert gen.cfg.cond_norm == "whiten" and not torch.equal(gen.cond_transform, torch.eye(len(gen.cond_transform)))
    script = Path(__file__).parents[1] / "scripts" / "condition_loudness.py"
    base, flipped, recoloured = runpy.run_path(str(script))["edits"](compositions("position"))
    assert (base[0], flipped[0], recoloured[0]) == ("a photo of a red circle left of a green square",
                                                    "a photo of a red circle right of a green square",
                                                    "a photo of a blue circle left of a green square")
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(rows) == {"none", "standardize", "whiten"}
    assert all(r["relation"] > 0 and r["colour"] > 0 for r in rows.values())


def test_unseen_colour_script(tiny_run, monkeypatch, capsys):
    """scripts/unseen_colour.py (docs/status.md, "Where unseen colour is lost"): colour answers on
    unseen scenes, held-out objects apart, wrong answers sorted by where their colour comes from."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "unseen_colour.py"
    ns = runpy.run_path(str(script))
    rows = [{"unseen": True, "questions": ["what color is the triangle?", "what color is the circle?", "how many?"],
             "answers": ["purple", "red", "two"], "question_types": ["color", "color", "count"],
             "objects": [{"shape": "triangle", "color": "purple", "bbox": [4, 4, 16, 16]},
                         {"shape": "circle", "color": "red", "bbox": [30, 30, 44, 44]}]},
            {"unseen": False, "questions": ["what color is the square?"], "answers": ["blue"],
             "question_types": ["color"], "objects": [{"shape": "square", "color": "blue", "bbox": [4, 4, 16, 16]}]}]
    items = ns["colour_items"](rows)
    assert [(i, a, held, others) for i, _, a, held, others in items] == [(0, "purple", True, {"red"}),
                                                                          (0, "red", False, {"purple"})]
    assert ns["sort_answers"](items, ["red", "red"], True) == (1, 0.0, 1.0, 0.0)  # the circle's colour
    assert ns["sort_answers"](items, ["green", "green"], False) == (1, 0.0, 0.0, 1.0)  # in no object
    _, out = tiny_run
    monkeypatch.setattr(sys, "argv", [str(script), str(out), "--scenes", "60"])
    runpy.run_path(str(script), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("run") and [ln.split()[1] for ln in lines[1:]] == ["held", "seen"]
    for ln in lines[1:]:
        fractions = [float(v) for v in ln.split()[-3:]]
        assert int(ln.split()[-4]) == 0 or abs(sum(fractions) - 1) < 1e-3


def test_stage_summaries_say_when_the_time_is_a_resumed_runs_part():
    # a stage resumed from a checkpoint times only its own call: the summary must say so
    from blip3o_mini.generation_stage import _summary

    m = {"train_steps": 3600, "train_seconds": 3702.0, "final_loss": 0.325, "backbone_unchanged": True,
         "vqa_accuracy_after": 0.9642}
    assert "resumed" not in _summary({**m, "resumed_from_step": None})
    assert "resumed" not in _summary({**m, "resumed_from_step": 0})  # the decoder's fresh runs record 0
    assert "3600 steps in 3702 s (resumed at step 1000: the time is from there on)" in _summary(
        {**m, "resumed_from_step": 1000})
    report = build_report({"clip": {"resumed_from_step": None}, "generation": {**m, "resumed_from_step": 1000}},
                          {"clip": 0.5, "generation": 3755.7}, 3756.2)
    table = report_markdown(report)
    assert "| clip | 0.5 |" in table
    assert "| generation | 3755.7 (resumed at step 1000: the time is from there on) |" in table


def test_relation_loss_gap_prompts():
    """scripts/relation_loss_gap.py's edits of a two-object scene: both word orders, the relation
    flipped, the colours swapped between the shapes, by the run's relation rule; nothing for scenes
    it cannot edit."""
    import runpy
    from pathlib import Path

    from blip3o_mini.data.world import Obj, Scene

    prompts = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "relation_loss_gap.py"))["relation_prompts"]
    circle, square = Obj("circle", "red", (4, 20, 16, 32)), Obj("square", "blue", (40, 20, 52, 32))
    assert prompts(Scene((circle, square))) == [
        ("a photo of a red circle left of a blue square", "a photo of a red circle right of a blue square",
         "a photo of a blue circle left of a red square"),
        ("a photo of a blue square right of a red circle", "a photo of a blue square left of a red circle",
         "a photo of a red square right of a blue circle")]
    assert prompts(Scene((circle,))) == []
    assert prompts(Scene((circle, Obj("square", "blue", (6, 40, 18, 52))))) [0][0] == \
        "a photo of a red circle above a blue square"
    steep = Scene((circle, Obj("square", "blue", (14, 48, 26, 60))))  # 10 px across, 28 px down
    assert prompts(steep)[0][0] == "a photo of a red circle left of a blue square"  # the toy's rule
    assert prompts(steep, "dominant_axis")[0][:2] == ("a photo of a red circle above a blue square",
                                                      "a photo of a red circle below a blue square")


def zero_head_checkpoint(gen, path, step: int) -> dict:
    """A generation-stage checkpoint (the LightningModule's `generator.` weights) of `gen` with
    the DiT's output layer zeroed, so that it predicts v = 0 whatever the prompt; returns its
    state dict."""
    state = {f"generator.{k}": v.clone() for k, v in gen.state_dict().items()}
    for k in ("dit.final.linear.weight", "dit.final.linear.bias"):
        state[f"generator.{k}"].zero_()
    torch.save({"state_dict": state, "global_step": step}, path)
    return state


def test_relation_loss_gap_script(tiny_run, monkeypatch, capsys):
    """scripts/relation_loss_gap.py on a finished run: each edit's loss at the same noise, equal to
    the flow loss computed by hand for the row's own image; the null edit is the zero condition."""
    import runpy
    import sys
    from pathlib import Path

    import datasets

    from blip3o_mini.data.dataset import scene_of
    from blip3o_mini.features import load_split_features
    from blip3o_mini.flow import interpolate, velocity_target
    from blip3o_mini.generation_stage import load_generator
    from blip3o_mini.understanding_stage import load_stage_backbone

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "relation_loss_gap.py"
    ns = runpy.run_path(str(script))
    val = datasets.load_from_disk(str(out / "data" / "shapesworld"))["val"]
    rows = [(i, *p) for i, r in enumerate(val) for p in ns["relation_prompts"](scene_of(r))]
    assert len({r[0] for r in rows}) >= 2
    gen, backbone = load_generator(out / "generation"), load_stage_backbone(out / "understanding").freeze()
    feats = load_split_features(out / "clip", "val")
    with torch.no_grad():
        q_edits = ns["edit_conditions"](gen, backbone, rows)
        losses, times, moves = ns["edit_losses"](gen, q_edits, rows, feats, 2, torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        x1 = gen.normalize(feats[[r[0] for r in rows]].float())
        x0, t = torch.randn(x1.shape, generator=g), torch.rand(len(rows), generator=g)
        xt, vt = interpolate(x0, x1, t), velocity_target(x0, x1)
        k = len(rows) - 1  # the last row: its own image, its flipped prompt, and the zero condition
        q = gen.condition(backbone, [rows[k][2]])
        assert torch.allclose(losses["relation flipped"][k, 0], (gen.dit(xt[k:], t[k:], q, None) - vt[k:]).pow(2).mean())
        assert torch.allclose(losses["null"][k, 0],
                              (gen.dit(xt[k:], t[k:], torch.zeros_like(q), None) - vt[k:]).pow(2).mean())
        v_true = gen.dit(xt[k:], t[k:], gen.condition(backbone, [rows[k][1]]), None)
        assert torch.allclose(moves["relation flipped"][k, 0], (gen.dit(xt[k:], t[k:], q, None) - v_true).pow(2).mean())
        assert moves["true"].abs().max() == 0
    assert torch.equal(times[:, 0], t)
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "2"])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["all"]["draws"] == 2 * len([r for r in rows if not scene_of(val[r[0]]).unseen])
    assert set(results["all"]["share"]) == set(results["all"]["moved"]) == {"relation flipped", "colours swapped",
                                                                            "other scene"}
    # --ckpt scores a training checkpoint's weights: one whose DiT predicts v = 0 hears no prompt
    state = zero_head_checkpoint(gen, out.parent / "step7.ckpt", 7)
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "1",
                                      "--ckpt", str(out.parent / "step7.ckpt")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "(step 7)" in printed
    loss = json.loads(printed.strip().splitlines()[-1])["all"]["loss"]
    assert loss["true"] == loss["relation flipped"] == loss["null"] > 0
    # --dit scores DiT weights saved alone (ablate_dit_geneval.py --save): the same zeroed head
    from blip3o_mini.artifacts import save_tensors

    save_tensors(out.parent / "dit.safetensors", {k.removeprefix("generator.dit."): v for k, v in state.items()
                                                  if k.startswith("generator.dit.")})
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "1",
                                      "--dit", str(out.parent / "dit.safetensors")])
    runpy.run_path(str(script), run_name="__main__")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["all"]["loss"] == loss


def test_noise_end_layout_estimators():
    """scripts/noise_end_layout.py's figures: the split-half estimate of a mean map's layout is not
    inflated by the draws' scatter (where one draw's spread is), mirroring follows the pair's axis,
    and a predictor that draws the relation has the mirror image of its map under the flipped prompt."""
    import runpy
    from pathlib import Path

    ns = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "noise_end_layout.py"))
    grid = torch.arange(4.0).view(1, 1, 4, 1).repeat(2, 1, 1, 1)  # [[0, 1], [2, 3]] twice: (2, 1, 4, 1)
    m = ns["mirror"](grid, torch.tensor([True, False]))
    assert m[0, 0, :, 0].tolist() == [1, 0, 3, 2] and m[1, 0, :, 0].tolist() == [2, 3, 0, 1]
    # a fixed map (spread 1.25 over the grid) under noise of variance 4: one draw spreads
    # 1.25 + 4 * 3/4 (the noise centred over 4 places), the mean of the draws 1.25
    g = torch.Generator().manual_seed(0)
    mean_map = torch.arange(4.0).view(1, 1, 4, 1).expand(50, 400, 4, 1)
    draws = mean_map + 2 * torch.randn(50, 400, 4, 1, generator=g)  # (n, draws, N, L)
    assert ns["grid_spread"](draws).mean().item() == pytest.approx(4.25, rel=0.05)
    assert ns["split_half_product"](draws).mean().item() == pytest.approx(1.25, abs=0.05)
    # a deterministic predictor: a map on the left under the true prompt, its mirror under the flip
    left = torch.tensor([2.0, 0.0, 2.0, 0.0]).view(1, 1, 4, 1)  # (1, 1, N, L)
    fig = ns["layout_figures"](left, ns["mirror"](left, torch.tensor([True])), torch.tensor([True]))
    assert fig["layout of the mean"] == 1.0 and fig["mirror-asymmetric"] == 1.0 and fig["relation in the mean"] == 4.0
    same = ns["layout_figures"](left, left, torch.tensor([True]))
    assert same["relation in the mean"] == 0.0 and same["mirror-asymmetric"] == 1.0
    # word order: one scene in its two word orders; "A right of B" names the right object first
    right = ns["mirror"](left, torch.tensor([True]))[:, 0]  # (1, N, L): the scene, A on the right
    d_model = (right - left[:, 0]).expand(2, 2, 4, 1)  # each row's flip, two fits: (2, 2, N, L)
    prompts = ["a photo of a red circle right of a blue square", "a photo of a blue square left of a red circle"]
    axis = torch.tensor([True, True])
    follows = torch.cat([left[:, 0], right])  # A drawn left in row 0 though it is right: word order
    assert ns["word_order"](follows, d_model, prompts, axis) == {"all": 1.0, "left / right": 1.0}
    reads = torch.cat([right, right])  # both rows drawn as the scene: the relation read
    assert ns["word_order"](reads, d_model, prompts, axis) == {"all": 0.0, "left / right": 0.0}


def test_noise_end_layout_script(tiny_run, monkeypatch, capsys):
    """scripts/noise_end_layout.py on a finished run, and on DiT weights that predict v = 0: their
    guess from pure noise is the noise itself, with no layout in its mean and no relation."""
    import runpy
    import sys
    from pathlib import Path

    from blip3o_mini.artifacts import save_tensors
    from blip3o_mini.generation_stage import load_generator

    _, out = tiny_run
    script = Path(__file__).parents[1] / "scripts" / "noise_end_layout.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "4"])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["figures"]["the DiT"]["layout of one draw"] > 0
    assert results["figures"]["mean image, linear in the objects alone"]["relation in the mean"] == 0
    state = {k: v.clone() for k, v in load_generator(out / "generation").dit.state_dict().items()}
    for k in ("final.linear.weight", "final.linear.bias"):
        state[k].zero_()
    save_tensors(out.parent / "dit-v0.safetensors", state)
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "64",
                                      "--dit", str(out.parent / "dit-v0.safetensors")])
    runpy.run_path(str(script), run_name="__main__")
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dit = results["figures"]["the DiT"]
    assert dit["relation in the mean"] == 0 and results["along"] == 0
    assert dit["layout of one draw"] == pytest.approx(1.0, rel=0.1)  # unit noise, spread over the grid
    assert abs(dit["layout of the mean"]) < 0.05  # the noises' mean has no layout
    # --ckpt scores a checkpoint of a stage still training (here: a copy of the run whose
    # generation stage is not marked complete), weights from the checkpoint: the same v = 0 head
    import shutil

    unfinished = out.parent / "unfinished"
    shutil.copytree(out, unfinished, ignore=lambda d, names: ["stage.json"] if d.endswith("generation") else [])
    zero_head_checkpoint(load_generator(out / "generation"), out.parent / "step9.ckpt", 9)
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(unfinished), "--draws", "64",
                                      "--ckpt", str(out.parent / "step9.ckpt")])
    runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert "(step 9)" in printed
    assert json.loads(printed.strip().splitlines()[-1])["figures"]["the DiT"] == dit
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(unfinished), "--draws", "4"])
    with pytest.raises(SystemExit, match="has not finished; pass --ckpt"):
        runpy.run_path(str(script), run_name="__main__")
    # --dit-pos-embed rebuilds the DiT with the table its weights were trained with: the same
    # weights then guess otherwise
    own = {k: v.clone() for k, v in load_generator(out / "generation").dit.state_dict().items()}
    save_tensors(out.parent / "dit-own.safetensors", own)
    figures = []
    for extra in ([], ["--dit-pos-embed", "sincos"]):
        monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "4",
                                          "--dit", str(out.parent / "dit-own.safetensors"), *extra])
        runpy.run_path(str(script), run_name="__main__")
        printed = capsys.readouterr().out
        assert f"(pos_embed {extra[1] if extra else 'none'})" in printed
        figures.append(json.loads(printed.strip().splitlines()[-1])["figures"]["the DiT"])
    assert figures[0]["layout of one draw"] != figures[1]["layout of one draw"]
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--dit-pos-embed", "sincos"])
    with pytest.raises(SystemExit, match="pass --dit too"):
        runpy.run_path(str(script), run_name="__main__")
    monkeypatch.setattr(sys, "argv", [str(script), "--run-dir", str(out), "--draws", "1"])
    with pytest.raises(SystemExit, match="at least 2"):
        runpy.run_path(str(script), run_name="__main__")
