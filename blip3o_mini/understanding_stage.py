"""The "understanding" stage (Stage 1b): build the tokenizer, train the toy backbone on cached
CLIP features, evaluate VQA and captioning on the val scenes; and the Python `answer` API.

Writes RUN_DIR/understanding/:
  backbone/           ToyBackbone.save: model.safetensors, backbone_config.json,
                      lm_config.json (transformers), tokenizer/ (PreTrainedTokenizerFast)
  loss_history.json   (step, loss) pairs, for the notebook's loss curve
  type_loss_history.json  {question type: (step, held-out answer loss) pairs}, with
                      `understanding.train.type_loss_every`
  metrics.json        vqa_accuracy (seen), vqa_accuracy_unseen, vqa_accuracy_<type>,
                      vqa_accuracy_<n>_objects, caption_accuracy, timings
  config.json         the config section this stage ran with
  stage.json          written last (mark_complete)
A config with `pretrained` set (the full run's Qwen2.5-VL) trains nothing: BLIP3-o uses the
backbone as released; the stage records the name and evaluates it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete
from .backbone import BackboneConfig, ToyBackbone
from .config import build, relation_rule, with_run_seed
from .report import resumed_note
from .run import StageResult, finish_on_rank_zero, remove_stale_checkpoints
from .training.compile import without_speed_keys
from .training.distributed import stage_trainer_config
from .training.understanding import UnderstandingTrainConfig, torch_threads, training_turns

UNDERSTANDING_STAGE_VERSION = 1  # bump when this stage's outputs change meaning
BACKBONE_DIR = "backbone"
TRAIN_COLUMNS = ["captions", "questions", "answers", "objects"]  # objects: position turns


@dataclass
class UnderstandingEvalConfig:
    max_scenes: int | None = None  # None: every val scene
    batch_size: int = 256
    captions: bool = True


@dataclass
class UnderstandingConfig:
    pretrained: str | None = None  # e.g. "Qwen/Qwen2.5-VL-7B-Instruct": used as is, no training
    vocab_size: int = 1024  # BPE upper bound; ShapesWorld needs ~400
    backbone: dict | None = None  # BackboneConfig fields (vision_dim / num_image_tokens: from CLIP)
    train: dict | None = None  # UnderstandingTrainConfig fields
    eval: dict | None = None  # UnderstandingEvalConfig fields


def understanding_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    import datasets

    from .evaluation.vqa import vqa_accuracy
    from .features import load_encoder, load_split_features
    from .tokenizer import build_tokenizer, shapesworld_texts
    from .training.understanding import train_understanding

    section = cfg.get("understanding", {})
    clip = upstream["clip"]
    key = fingerprint("understanding", UNDERSTANDING_STAGE_VERSION, cfg.get("seed", 0), without_speed_keys(section),
                      clip.key)  # switching `train.compile` keeps a trained stage
    out = Path(run_dir) / "understanding"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(summary(metrics))
        return StageResult("understanding", key, out, True, metrics)

    ucfg = build(UnderstandingConfig, section)
    train_cfg, eval_cfg = build(UnderstandingTrainConfig, ucfg.train), build(UnderstandingEvalConfig, ucfg.eval)
    with_run_seed(train_cfg, cfg, ucfg.train)  # one seed for the LM's start and its data order
    ds = datasets.load_from_disk(str(upstream["data"].path / "shapesworld"))
    metrics: dict = {}
    result = None
    if ucfg.pretrained:
        from .qwen_vl import QwenVLBackbone

        backbone = QwenVLBackbone.from_pretrained(ucfg.pretrained)
    else:
        train_rows = ds["train"].select_columns(TRAIN_COLUMNS).to_list()
        rule = relation_rule(cfg)  # the rows' text was written by it
        tokenizer = build_tokenizer(shapesworld_texts(train_rows, train_cfg.position_turns, train_cfg.direction_turns,
                                                      rule), vocab_size=ucfg.vocab_size)
        features = load_split_features(clip.path, "train")  # (N, 64, D), frozen CLIP, cached
        bcfg = build(BackboneConfig, (ucfg.backbone or {}) | {"vision_dim": features.shape[-1],
                                                              "num_image_tokens": features.shape[1]})
        torch.manual_seed(train_cfg.seed)  # `understanding.train.seed` draws another start, not only another order
        backbone = ToyBackbone(bcfg, tokenizer)
        ckpt_dir = out / f"lightning-{key}"  # resume state of this config only
        remove_stale_checkpoints(out, ckpt_dir)
        held_out = None
        if train_cfg.type_loss_every:  # val questions of seen compositions per type, to watch each being learned
            columns = ["questions", "answers", "question_types", "unseen"]
            if missing := sorted(set(columns) - set(ds["val"].column_names)):
                raise ValueError(f"understanding.train.type_loss_every needs val rows with {missing}; "
                                 "ShapesWorld rows carry them: set it to 0 for this dataset")
            val_rows = ds["val"].select_columns(columns).to_list()
            seen = [i for i, r in enumerate(val_rows) if not r["unseen"]]
            held_out = (load_split_features(clip.path, "val")[seen], [val_rows[i] for i in seen])
        result = train_understanding(backbone, features, train_rows, train_cfg, ckpt_dir,
                                     trainer=stage_trainer_config(cfg, train_cfg.precision),
                                     turns=training_turns(train_cfg, rule), held_out=held_out)
        backbone.encoder = load_encoder(clip.path).requires_grad_(False).eval()
        num_params = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith("encoder."))
        metrics |= result.metrics() | {
            "num_parameters": num_params,
            "tokens_per_second": round(result.steps * train_cfg.batch_size
                                       * result.extra["tokens_per_row"] / max(result.seconds, 1e-9))} | result.extra

    def write() -> None:  # global rank 0 only (run.finish_on_rank_zero)
        if result is not None:
            atomic_write_json(out / "loss_history.json", result.loss_history)
            if "type_loss" in result.curves:
                atomic_write_json(out / "type_loss_history.json", result.curves["type_loss"])
            else:  # not recorded by this config: no stale curve from an earlier one
                (out / "type_loss_history.json").unlink(missing_ok=True)
            backbone.save(out / BACKBONE_DIR)
        with torch_threads(train_cfg.num_threads):
            res = vqa_accuracy(backbone, ds["val"], batch_size=eval_cfg.batch_size,
                               max_scenes=eval_cfg.max_scenes, captions=eval_cfg.captions)
        print(res.table())
        metrics.update(res.to_metrics())
        atomic_write_json(out / "mistakes.json", res.mistakes)
        atomic_write_json(out / "metrics.json", metrics)
        atomic_write_json(out / "config.json", {"understanding": asdict(ucfg), "clip_key": clip.key,
                                                "seed": cfg.get("seed", 0)})
        print(summary(metrics))
        mark_complete(out, key, metrics=metrics)
        for done in out.glob("lightning-*"):  # resume state is not needed once the stage is complete
            shutil.rmtree(done, ignore_errors=True)

    return finish_on_rank_zero("understanding", key, out, result and result.trainer, write)


def summary(m: dict) -> str:
    fmt = lambda k: "-" if m.get(k) is None else f"{m[k]:.3f}"  # noqa: E731
    trained = (f"trained {m['train_steps']} steps ({m['epochs']} epochs) in {m['train_seconds']:.0f} s"
               f"{resumed_note(m)}, "
               f"final loss {m['final_loss']:.3f}; ") if m.get("train_steps") else ""
    return (f"understanding: {trained}VQA {fmt('vqa_accuracy')} seen / {fmt('vqa_accuracy_unseen')} unseen, "
            f"captions {fmt('caption_accuracy')} seen / {fmt('caption_accuracy_unseen')} unseen")


def load_stage_backbone(stage_dir: str | Path, encoder=None):
    """The backbone of a finished understanding stage directory, ready to answer from images:
    the toy backbone with `encoder` (default: the run's CLIP stage encoder), or the configured
    pretrained Qwen2.5-VL."""
    from .features import ENCODER_DIR, load_encoder

    stage = Path(stage_dir)
    if not (stage / "stage.json").exists():
        raise FileNotFoundError(f"{stage} holds no finished understanding stage; train it with "
                                f"`blip3o-mini run --out {stage.parent}` (or pass --run-dir of a finished run)")
    pretrained = json.loads((stage / "config.json").read_text())["understanding"].get("pretrained")
    if pretrained:
        from .qwen_vl import QwenVLBackbone

        return QwenVLBackbone.from_pretrained(pretrained)
    if encoder is None and (stage.parent / "clip" / ENCODER_DIR).is_dir():
        encoder = load_encoder(stage.parent / "clip")
    return ToyBackbone.load(stage / BACKBONE_DIR, encoder=encoder)


def load_understanding(run_dir: str | Path):
    """`load_stage_backbone` of a run directory."""
    return load_stage_backbone(Path(run_dir) / "understanding")


def evaluate_stage_vqa(backbone, run_dir: str | Path) -> float:
    """VQA accuracy (seen compositions) of `backbone` on the run's val split with the
    understanding stage's evaluation settings: stage 2 re-runs it to show that training the
    generator left understanding untouched."""
    import datasets

    from .evaluation.vqa import vqa_accuracy

    run_dir = Path(run_dir)
    config = json.loads((run_dir / "understanding" / "config.json").read_text())["understanding"]
    ecfg = build(UnderstandingEvalConfig, config.get("eval"))
    threads = build(UnderstandingTrainConfig, config.get("train")).num_threads
    ds = datasets.load_from_disk(str(run_dir / "data" / "shapesworld"))
    with torch_threads(threads):
        return vqa_accuracy(backbone, ds["val"], batch_size=ecfg.batch_size, max_scenes=ecfg.max_scenes).vqa_accuracy


def answer(image, question: str, run_dir: str | Path | None = None, backbone=None,
           max_new_tokens: int = 40) -> str:
    """Answer one question about one image (a path, PIL image or uint8 (3, H, W) tensor; other
    sizes and modes are converted as `backbone_interface.load_image` documents)."""
    from .artifacts import default_run_dir

    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty; ask something about the image, e.g. \"how many objects are there?\"")
    backbone = backbone or load_understanding(run_dir or default_run_dir())
    images = image[None] if isinstance(image, torch.Tensor) and image.ndim == 3 else [image]
    return backbone.answer(images, [question], max_new_tokens=max_new_tokens)[0]
