"""GenEval's image folder layout, so images from any generator are scored the same way.

    OUT/00000/metadata.jsonl      one prompt's metadata (a single JSON object, as GenEval)
    OUT/00000/samples/0000.png    its samples
    OUT/00001/...

This mirrors GenEval's `generation/diffusers_generate.py` output, which its
`evaluation/evaluate_images.py` reads; any `NNNN.png` name is accepted when reading.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from .prompts import validate_metadata

# generate_fn(batch of metadata dicts, seed) -> one PIL image per dict, in order
GenerateFn = Callable[[list[dict], int], list[Image.Image]]
_PROMPT_DIR = re.compile(r"^\d+$")
_SAMPLE = re.compile(r"^\d+\.png$")


def batch_seed(seed: int, first_prompt: int) -> int:
    """The seed handed to `generate_fn` for the batch starting at prompt `first_prompt`."""
    return seed * 1_000_000 + first_prompt


def write_geneval_folder(
    out: str | Path,
    prompts: list[dict],
    generate_fn: GenerateFn,
    samples_per_prompt: int = 4,
    prompts_per_batch: int = 1,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write `samples_per_prompt` images for every prompt into GenEval's layout.

    Each call of `generate_fn` gets `prompts_per_batch` prompts' metadata, each repeated
    `samples_per_prompt` times (prompt-major), and the seed `batch_seed(seed, first prompt)`;
    it returns one image per entry. With `prompts_per_batch=1` a prompt's images depend only
    on its index and `seed`.
    """
    if samples_per_prompt < 1 or prompts_per_batch < 1:
        raise ValueError(f"samples_per_prompt and prompts_per_batch must be >= 1, got "
                         f"{samples_per_prompt} and {prompts_per_batch}")
    if not prompts:
        raise ValueError("no prompts to generate images for")
    out = Path(out)
    existing = [p for p in out.glob("*") if p.is_dir() and _PROMPT_DIR.match(p.name)] if out.exists() else []
    if existing and not overwrite:
        raise ValueError(f"{out} already holds GenEval prompt folders; choose a new output "
                         "directory or pass overwrite=True (--overwrite)")
    for p in existing + [out / "results.json", out / "results.jsonl"]:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for start in range(0, len(prompts), prompts_per_batch):
        chunk = prompts[start:start + prompts_per_batch]
        batch = [m for m in chunk for _ in range(samples_per_prompt)]
        images = generate_fn(batch, batch_seed(seed, start))
        if len(images) != len(batch):
            raise ValueError(f"generate_fn returned {len(images)} images for a batch of {len(batch)}")
        for j, m in enumerate(chunk):
            folder = out / f"{start + j:05d}"
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "metadata.jsonl").write_text(json.dumps(m) + "\n")
            for k in range(samples_per_prompt):
                images[j * samples_per_prompt + k].save(folder / "samples" / f"{k:04d}.png")
    return out


def read_geneval_folder(root: str | Path) -> Iterator[tuple[str, dict, list[Path]]]:
    """Yield `(folder name, metadata, sample paths)` for every prompt folder, in order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory; write one with `blip3o-mini geneval "
                                "reference --out DIR` or evaluation.write_geneval_folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and _PROMPT_DIR.match(p.name))
    folders = [p for p in folders if (p / "metadata.jsonl").is_file()]
    if not folders:
        raise FileNotFoundError(f"{root} holds no <00000>/metadata.jsonl prompt folders (GenEval "
                                "layout); write one with `blip3o-mini geneval reference --out DIR`")
    for folder in folders:
        text = (folder / "metadata.jsonl").read_text().strip()
        try:
            metadata = json.loads(text.splitlines()[0]) if text else None
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / 'metadata.jsonl'}: not valid JSON ({e.msg})") from None
        validate_metadata(metadata, str(folder / "metadata.jsonl"))
        samples = sorted(p for p in (folder / "samples").glob("*.png") if _SAMPLE.match(p.name))
        if not samples:
            raise ValueError(f"{folder}: no samples/NNNN.png images for prompt {metadata['prompt']!r}")
        yield folder.name, metadata, samples
