"""The "instruct" stage: BLIP3-o's instruction tuning (DESIGN.md section 1). After stage 2 has
pretrained the 64 queries and the DiT on the pretraining shards, the same generator keeps
training on BLIP3o-60k's prompt-image shards (`data.instruct_shards`, >= 10k steps).

Same code as the generation stage (`generation_stage.train` -> `generation_run` ->
GenerationModule); only the data and the trainer numbers differ: `instruct_config` rewrites the
config so that `data.shards` names the instruct shards and `generation.train` takes the
`instruct.train` overrides (max_steps, lr, ...). The generator starts from the generation
stage's weights (feature mean/std included), the backbone stays frozen.

Runs only when the config sets `data.instruct_shards` (`run.stages_for`), after `generation`.
Targets: `data.targets: features` reads `blip3o-mini extract --shards <instruct shards> --out
FEATURES_DIR/instruct` (a folder of its own: shard names of the two sets may repeat); `images`
encodes with the pretrained CLIP every step, as the generation stage.

Writes RUN_DIR/instruct/ with generation_stage's files (generator.safetensors, ... stage.json);
`Blip3oMiniPipeline.from_run` samples with it when it exists. (The evaluation stage scores
ShapesWorld runs, which have no instruct stage.)
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .artifacts import fingerprint, stage_complete
from .run import StageResult, finish_on_rank_zero, remove_stale_checkpoints

INSTRUCT_STAGE_VERSION = 1
FEATURES_SUBDIR = "instruct"  # FEATURES_DIR/instruct: the instruct shards' extracted targets


def resolve_instruct_shards(cfg: dict) -> list[str]:
    from .data.webdataset import resolve_shards

    try:
        return resolve_shards(cfg["data"]["instruct_shards"])
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.instruct_shards: {e} (download BLIP3o-60k, or drop instruct_shards "
                                "and the instruct stage)") from None


def instruct_config(cfg: dict, run_dir: Path) -> dict:
    """`cfg` as the generation code reads it for instruction tuning: data.shards = the instruct
    shards (their targets under FEATURES_DIR/instruct), generation.train updated by instruct.train."""
    from .shard_stages import features_dir, uses_shards

    section = cfg.get("instruct") or {}
    if set(section) - {"train"}:
        raise ValueError(f"unknown instruct option(s) {sorted(set(section) - {'train'})}; the section "
                         "holds train: (generation.train keys to override, e.g. max_steps, lr)")
    if not uses_shards(cfg):
        raise ValueError("data.instruct_shards needs data.shards (the pretraining shards the generation "
                         "stage trains on first); instruction tuning runs only after pretraining on shards")
    out = copy.deepcopy(cfg)
    out["data"]["features_dir"] = str(features_dir(cfg, run_dir) / FEATURES_SUBDIR)
    out["data"]["shards"] = out["data"].pop("instruct_shards")
    gen = out.setdefault("generation", {})
    gen["train"] = {**(gen.get("train") or {}), **(section.get("train") or {})}
    return out


def instruct_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .generation_stage import _summary, load_generator, train, train_metrics, weights_hash, \
        write_generator_stage
    from .shard_stages import check_features, index_shard, shard_targets
    from .understanding_stage import load_stage_backbone

    icfg = instruct_config(cfg, run_dir)
    gen, clip, und = upstream["generation"], upstream["clip"], upstream["understanding"]
    shards = resolve_instruct_shards(cfg)
    local = [s for s in shards if "://" not in s]
    files = [(s, Path(s).stat().st_size, Path(s).stat().st_mtime_ns) for s in local]
    fdir = Path(icfg["data"]["features_dir"])
    features = sorted((p.name, p.stat().st_size) for p in fdir.glob("*.safetensors"))
    key = fingerprint("instruct", INSTRUCT_STAGE_VERSION, cfg.get("seed", 0), icfg["generation"]["train"],
                      files, clip.metrics["targets"], features, gen.key)
    out = Path(run_dir) / "instruct"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_summary(metrics, "instruct"))
        return StageResult("instruct", key, out, True, metrics)

    if clip.metrics["targets"] == "features":  # every instruct shard extracted, by the stage-2 encoder
        made = check_features(icfg, run_dir)
        if made["encoder_hash"] != clip.metrics["encoder_hash"]:
            raise ValueError(f"{fdir} holds features of encoder {made['encoder_hash']} but stage 2 trained on "
                             f"{clip.metrics['encoder_hash']}; extract again with `blip3o-mini extract --config ...`")
    num_samples = sum(index_shard(s)["num_samples"] for s in local)  # also: every sample has a caption
    targets = shard_targets(icfg, run_dir, upstream)
    backbone = load_stage_backbone(und.path).freeze()
    hash_before = weights_hash(backbone)
    generator = load_generator(gen.path)  # the generation stage's queries + DiT: tuning continues them
    start_hash = weights_hash(generator)
    ckpt_dir = out / f"lightning-{key}"
    remove_stale_checkpoints(out, ckpt_dir)
    result = train(icfg, generator, backbone, targets.dataset, ckpt_dir, targets.encoder)

    def write() -> None:  # global rank 0 only
        metrics = train_metrics(result, generator) | {
            "started_from": str(gen.path), "generator_hash_start": start_hash,
            "generator_hash_after": weights_hash(generator), "num_shards": len(shards),
            "num_train_samples": num_samples, "targets": clip.metrics["targets"],
            "backbone_unchanged": hash_before == weights_hash(backbone), "vqa_accuracy_after": None}
        print(_summary(metrics, "instruct"))
        write_generator_stage(out, key, generator, result, metrics, ckpt_dir,
                              {"instruct": cfg.get("instruct"), "instruct_shards": cfg["data"]["instruct_shards"],
                               "generation_key": gen.key})

    return finish_on_rank_zero("instruct", key, out, result.trainer, write)
