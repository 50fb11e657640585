"""The main job's report: `RUN_DIR/report.json` (machine-readable) and `RUN_DIR/report.md`
(what a student reads), built from the metrics every stage recorded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CLIP_KEYS = ("zero_shot_color_acc", "zero_shot_shape_acc", "zero_shot_color_acc_unseen",
             "zero_shot_shape_acc_unseen", "recall_at_1")  # accuracies: seen compositions, then unseen


def build_report(metrics: dict[str, dict], timings: dict[str, float], total: float) -> dict[str, Any]:
    """`metrics` maps stage name -> its metrics.json content (stages that ran or were cached)."""
    clip = metrics.get("clip", {})
    und = metrics.get("understanding", {})
    gen = metrics.get("generation", {})
    dec = metrics.get("decoder", {})
    ev = metrics.get("evaluation", {})
    report: dict[str, Any] = {
        "geneval_mini": ev.get("geneval_mini"),
        "reconstruction_geneval_mini": dec.get("reconstruction_geneval_mini"),
        "clip": {k: clip.get(k) for k in CLIP_KEYS},
        "vqa": {"accuracy_before": und.get("vqa_accuracy"),
                "accuracy_after": gen.get("vqa_accuracy_after"),
                "backbone_unchanged": gen.get("backbone_unchanged")},
        "timings_s": timings,
        "total_s": total,
        "stages": metrics,
    }
    return report


def resumed_note(m: dict) -> str:
    """What a stage summary, and the report's time table, add after a stage's seconds when its run
    resumed from a checkpoint: they are that call's only (metrics.json's `resumed_from_step`)."""
    step = m.get("resumed_from_step")
    return f" (resumed at step {step}: the time is from there on)" if step else ""


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(report: dict, grid: str | None = None) -> str:
    lines = ["# blip3o-mini run report", ""]
    g = report.get("geneval_mini") or {}
    if g:
        lines += ["## GenEval-mini (generated images)", "", "| score | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in g.items()]
        lines.append("")
    lines += ["## Stage figures", "", "| figure | value |", "|---|---|",
              f"| reconstruction GenEval-mini (decoder on real CLIP features) | {_fmt(report.get('reconstruction_geneval_mini'))} |"]
    lines += [f"| CLIP {k} | {_fmt(v)} |" for k, v in report["clip"].items()]
    lines += [f"| VQA {k} | {_fmt(v)} |" for k, v in report["vqa"].items()]
    # this call's seconds: a cached stage costs only its check, a resumed one only its own part
    lines += ["", "## Time per stage (this run)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f}{resumed_note(report['stages'].get(k, {}))} |" for k, v in report["timings_s"].items()]
    lines += [f"| **total** | **{report['total_s']:.1f}** |", ""]
    if grid:
        lines += ["## Prompts and generations", "", f"![grid]({grid})", ""]
    return "\n".join(lines)


def write_report(run_dir: Path, report: dict) -> None:
    from .artifacts import atomic_write_bytes, atomic_write_json

    grid = run_dir / "evaluation" / "grid.png"
    atomic_write_json(run_dir / "report.json", report)
    md = report_markdown(report, str(grid.relative_to(run_dir)) if grid.exists() else None)
    atomic_write_bytes(run_dir / "report.md", md.encode())
