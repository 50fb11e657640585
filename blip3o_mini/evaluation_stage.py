"""The "evaluation" stage: generate GenEval-mini images with the whole pipeline, in GenEval's
folder layout (RUN_DIR/evaluation/geneval/<00000>/samples/<0000>.png, scorable by any
GenEval-style scorer), score them, save the pipeline, and draw an image grid of prompts and
generations.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .artifacts import atomic_write_json, fingerprint, mark_complete, stage_complete
from .config import build
from .run import StageResult

EVALUATION_STAGE_VERSION = 1


@dataclass
class EvaluationConfig:
    samples_per_prompt: int = 4  # GenEval's own number
    prompts_per_batch: int = 16
    seed: int = 0
    grid_prompts: int = 12
    prompts_per_tag: int | None = None  # None: all 54 of every tag (a smaller number for smoke tests)


def evaluation_stage(cfg: dict, run_dir: Path, upstream: dict) -> StageResult:
    from .evaluation import TAGS, make_prompts, score_folder, write_geneval_folder
    from .evaluation.score import summarize
    from .pipeline import Blip3oMiniPipeline, SamplingConfig

    section = cfg.get("evaluation", {})
    ecfg = build(EvaluationConfig, section)
    # Sampling numbers are the config's own (generation.flow, decoder.eval), as every pipeline's.
    sampling = SamplingConfig.from_config(cfg)
    key = fingerprint("evaluation", EVALUATION_STAGE_VERSION, section, asdict(sampling),
                      *(upstream[s].key for s in ("clip", "understanding", "generation", "decoder")))
    out = Path(run_dir) / "evaluation"
    if stage_complete(out, key):
        metrics = json.loads((out / "metrics.json").read_text())
        print(_summary(metrics))
        return StageResult("evaluation", key, out, True, metrics)

    pipe = Blip3oMiniPipeline.from_run(run_dir, sampling)
    pipe.save_pretrained(out / "pipeline")

    def generate(batch: list[dict], seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return pipe([m["prompt"] for m in batch], generator=g).images

    prompts = make_prompts()
    if ecfg.prompts_per_tag is not None:
        prompts = [m for t in TAGS for m in [p for p in prompts if p["tag"] == t][:ecfg.prompts_per_tag]]
    folder = write_geneval_folder(out / "geneval", prompts, generate, ecfg.samples_per_prompt,
                                  ecfg.prompts_per_batch, ecfg.seed, overwrite=True)
    result = score_folder(folder)
    summary = result.summary()
    # The target: the overall score (mean of tag accuracies) over seen-composition prompts.
    for name, flag in (("overall_seen", False), ("overall_unseen", True)):
        part = [r for r in result.records if r["unseen"] == flag]
        summary[name] = summarize(part).overall if part else None
    metrics = {"geneval_mini": summary, "num_images": len(prompts) * ecfg.samples_per_prompt,
               "sampling": asdict(ecfg) | asdict(sampling)}
    grid_figure(folder, out / "grid.png", ecfg.grid_prompts)
    print(_summary(metrics))
    atomic_write_json(out / "metrics.json", metrics)
    mark_complete(out, key, metrics=metrics)
    return StageResult("evaluation", key, out, False, metrics)


def grid_figure(folder: Path, path: Path, num_prompts: int = 12) -> None:
    """Prompts (two per tag) with their generated samples, one row per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .evaluation import read_geneval_folder

    by_tag: dict[str, list] = {}
    for _, meta, samples in read_geneval_folder(folder):
        if meta["prompt"] not in [m["prompt"] for m, _ in by_tag.get(meta["tag"], [])]:
            by_tag.setdefault(meta["tag"], []).append((meta, samples))
    rows = [r for tag in by_tag for r in by_tag[tag][:max(1, num_prompts // max(1, len(by_tag)))]]
    cols = max(len(s) for _, s in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.3 * cols + 2.6, 1.3 * len(rows)), squeeze=False)
    for r, (meta, samples) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(samples):
                ax.imshow(Image.open(samples[c]))
        axes[r][0].set_title(meta["prompt"].removeprefix("a photo of "), fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _summary(m: dict) -> str:
    from .evaluation import TAGS

    g = m["geneval_mini"]
    tags = ", ".join(f"{k} {v:.2f}" for k, v in g.items() if k in TAGS
                     and isinstance(v, float))
    seen = "n/a" if g.get("seen") is None else f"{g['seen']:.3f}"
    unseen = "n/a" if g.get("unseen") is None else f"{g['unseen']:.3f}"
    return (f"GenEval-mini: overall {g['overall']:.3f}, seen prompts {g['overall_seen']:.3f}, unseen "
            f"prompts {g['overall_unseen'] or 0:.3f} (tags with both: seen {seen}, unseen {unseen}); {tags}")
