"""The main job: every stage of the pipeline in order, each skipped when its artifact already
matches the config (DESIGN.md section 4), with a per-stage time table and `report.json`.

A stage is a function `(cfg, run_dir, upstream) -> StageResult`; `upstream` holds the results
of the stages before it, so a stage's fingerprint can include what it reads.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .artifacts import fingerprint, mark_complete, stage_complete
from .config import relation_rule
from .report import build_report, write_report

DATA_VERSION = 2  # bump when the ShapesWorld generator changes its output
RUN_CONFIG = "config.yaml"  # the resolved config `run_pipeline` last ran in a run directory


@dataclass
class StageResult:
    name: str
    key: str
    path: Path
    skipped: bool
    metrics: dict[str, Any] = field(default_factory=dict)


def data_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .data import generate, summarize
    import datasets

    section = cfg.get("data", {})
    key = fingerprint("data", DATA_VERSION, cfg.get("seed", 0), section)
    out = run_dir / "data"
    skipped = stage_complete(out, key)
    if skipped:
        ds = datasets.load_from_disk(str(out / "shapesworld"))
    else:
        ds = generate(out / "shapesworld", section.get("num_train", 10000), section.get("num_val", 1000),
                      cfg.get("seed", 0), relation_rule(cfg))
    summary = summarize(ds)
    print(summary)
    metrics = {"num_samples": summary.num_samples, "unseen_fraction": summary.unseen_fraction}
    if not skipped:
        mark_complete(out, key, metrics=metrics)
    return StageResult("data", key, out, skipped, metrics)


def remove_stale_checkpoints(out: Path, keep: Path) -> None:
    """Remove `out/lightning-*` resume states of other configs than `keep`'s, on global rank 0
    only (Lightning sets `rank_zero_only.rank` from the launcher's environment): under DDP every
    process runs the stage function, and two processes must not rmtree the same directory."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        for stale in Path(out).glob("lightning-*"):
            if stale != keep:
                shutil.rmtree(stale, ignore_errors=True)


def finish_on_rank_zero(name: str, key: str, out: Path, trainer, write: Callable[[], None]) -> StageResult:
    """The end of a stage: `write` (every artifact, `mark_complete` last) runs on global rank 0
    only while the other ranks wait at the strategy's barrier. Under DDP each process returns
    from `trainer.fit` into the stage function; without this all would write the same files and
    remove the same checkpoint directory at once. Every rank then returns rank 0's metrics, so
    all hold the same StageResult. `trainer` None (nothing trained): Lightning's rank from the
    launcher's environment, and the other ranks poll for rank 0's stage.json."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if trainer is None:
        if rank_zero_only.rank == 0:
            write()
        else:
            from .shard_stages import wait_for_stage

            wait_for_stage(out, key)
    else:
        try:
            if trainer.is_global_zero:
                write()
        finally:  # reached even when rank 0's write fails, so the others stop with the error below
            trainer.strategy.barrier(f"{name}-artifacts")
    if not stage_complete(out, key):
        raise RuntimeError(f"{out}: global rank 0 did not finish writing the {name} stage; see its error")
    return StageResult(name, key, out, False, json.loads((Path(out) / "metrics.json").read_text()))


def lazy(target: str) -> Callable[[dict, Path, dict], StageResult]:
    """A stage given as "module:function", imported only when it runs (so `--help` and the
    data stage never import torch-heavy modules)."""
    module, name = target.split(":")

    def stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
        import importlib

        return getattr(importlib.import_module(f"blip3o_mini.{module}"), name)(cfg, run_dir, upstream)

    stage.__name__ = name
    return stage


# Stages in pipeline order, as BLIP3-o trains: understanding first, then generation with the
# understanding backbone frozen; the decoder needs only the CLIP stage.
STAGES: list[tuple[str, Callable[[dict, Path, dict], StageResult]]] = [
    ("data", data_stage),
    ("clip", lazy("clip_stage:clip_stage")),  # Stage 1a: CLIP encoder + feature cache
    ("understanding", lazy("understanding_stage:understanding_stage")),  # Stage 1b
    ("generation", lazy("generation_stage:generation_stage")),  # Stage 2: queries + DiT
    ("instruct", lazy("instruct_stage:instruct_stage")),  # Stage 2 continued on BLIP3o-60k
    ("decoder", lazy("decoder_stage:decoder_stage")),  # CLIP features -> pixels
    ("evaluation", lazy("evaluation_stage:evaluation_stage")),  # GenEval-mini + report grid
]
# What each stage reads, so a notebook asking for the decoder does not train the generator.
NEEDS = {"data": [], "clip": ["data"], "understanding": ["data", "clip"],
         "generation": ["data", "clip", "understanding"],
         "instruct": ["data", "clip", "understanding", "generation"], "decoder": ["data", "clip"],
         "evaluation": ["data", "clip", "understanding", "generation", "decoder"]}
# A config that reads WebDataset shards (`data.shards`, the full runs) swaps these stages: the
# shards are indexed, the extracted targets checked, the pretrained backbone recorded (no
# training). Generation is the same stage either way, fed by `shard_targets`.
SHARD_STAGES = {"data": lazy("shard_stages:data_stage"), "clip": lazy("shard_stages:clip_stage"),
                "understanding": lazy("shard_stages:understanding_stage")}


def stages_for(cfg: dict) -> list[tuple[str, Callable[[dict, Path, dict], StageResult]]]:
    """STAGES in order, with the shard versions when the config reads WebDataset shards; the
    instruct stage only when the config names `data.instruct_shards` (the toy has none)."""
    from .shard_stages import uses_shards

    stages = [(n, s) for n, s in STAGES if n != "instruct" or (cfg.get("data") or {}).get("instruct_shards")]
    if not uses_shards(cfg):
        return stages
    return [(n, SHARD_STAGES.get(n, stage)) for n, stage in stages]


def check_runs(names: list[str], cfg: dict) -> None:
    """A ValueError when a stage asked for does not run under `cfg` (only `instruct` can be absent)."""
    absent = sorted(set(names) - {n for n, _ in stages_for(cfg)})
    if absent:
        raise ValueError(f"stage(s) {absent} do not run without data.instruct_shards; set it to the "
                         "BLIP3o-60k shards (e.g. data/BLIP3o-60k/*.tar) or drop instruct")


def ensure_stage(name: str, cfg: dict, run_dir: str | Path) -> dict[str, StageResult]:
    """Run (or load from cache) stage `name` and the stages it reads; notebooks start here."""
    if name not in NEEDS:
        raise ValueError(f"unknown stage {name!r}; stages are {list(NEEDS)}")
    check_runs([name], cfg)
    run_dir = Path(run_dir)
    results: dict[str, StageResult] = {}
    with stage_attention_kernel(cfg):
        for n, stage in stages_for(cfg):
            if n == name or n in NEEDS[name]:
                results[n] = stage(cfg, run_dir, results)
    return results


def stage_attention_kernel(cfg: dict):
    """The attention kernel the config's `trainer:` section asks for, around training,
    feature extraction, sampling and evaluation alike (training/attention_kernel.py)."""
    from .training.attention_kernel import attention_kernel
    from .training.distributed import trainer_config

    tc = trainer_config(cfg)
    return attention_kernel(tc.attention, tc.accelerator)


def selected_stages(cfg: dict) -> list[tuple[str, Callable[[dict, Path, dict], StageResult]]]:
    """The stages a config runs: its `stages:` list (full configs stop after generation), else all."""
    names = cfg.get("stages") or [n for n, _ in STAGES]
    unknown = sorted(set(names) - set(NEEDS))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in the config's stages:; stages are {list(NEEDS)}")
    missing = sorted({need for n in names for need in NEEDS[n]} - set(names))
    if missing:
        raise ValueError(f"the config's stages: {names} leave out {missing}, which they read; add them")
    if cfg.get("stages"):
        check_runs(names, cfg)
    return [(n, stage) for n, stage in stages_for(cfg) if n in names]


def run_config(run_dir: str | Path, default: str | Path = "toy") -> dict:
    """The config a run directory was made with (`RUN_DIR/config.yaml`, written by
    `run_pipeline`), else `load_config(default)`: a notebook pointed at any run directory asks
    `ensure_stage` for the same fingerprints and so reuses its stages instead of retraining."""
    from .config import load_config

    recorded = Path(run_dir) / RUN_CONFIG
    return load_config(recorded if recorded.exists() else default)


def run_pipeline(cfg: dict, run_dir: str | Path) -> dict:
    import yaml

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from .artifacts import atomic_write_bytes

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # every rank of a launched job runs this; one writes
        atomic_write_bytes(run_dir / RUN_CONFIG, yaml.safe_dump(cfg, sort_keys=False).encode())
    results: dict[str, StageResult] = {}
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with stage_attention_kernel(cfg):
        for name, stage in selected_stages(cfg):
            print(f"== stage: {name}")
            t0 = time.perf_counter()
            results[name] = stage(cfg, run_dir, results)
            timings[name] = round(time.perf_counter() - t0, 2)
    total = round(time.perf_counter() - start, 2)
    print(f"\n{'stage':<16} {'time (s)':>9}  status")
    for name, r in results.items():
        print(f"{name:<16} {timings[name]:>9.1f}  {'cached' if r.skipped else 'ran'}")
    print(f"{'total':<16} {total:>9.1f}")
    report = build_report({name: r.metrics for name, r in results.items()}, timings, total)
    if rank_zero_only.rank == 0:  # the stages' results are rank 0's on every rank (finish_on_rank_zero)
        write_report(run_dir, report)
        print(f"report: {run_dir / 'report.json'}, {run_dir / 'report.md'}")
    return report
