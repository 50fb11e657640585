"""Generate ShapesWorld splits as Hugging Face `datasets` (the same library BLIP3-o loads its
WebDataset shards with), deterministically for a seed on any machine.

Each sample's random stream is seeded from `(seed, split, index)`, so sample 17 of a split is
the same whether 100 or 100,000 samples are generated, and generation could be sharded.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .text import captions, questions
from .world import DEFAULT_RELATION_RULE, RELATION_RULES, Scene, render, sample_scene

SPLITS = {"train": 0, "val": 1, "test": 2}
# Training splits never contain a held-out composition; evaluation splits may.
ALLOWS_UNSEEN = {"train": False, "val": True, "test": True}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index])


def scene_at(seed: int, split: str, index: int) -> Scene:
    """The scene graph of `make_sample(seed, split, index)`, without rendering or text."""
    return sample_scene(_sample_rng(seed, split, index), allow_unseen=ALLOWS_UNSEEN[split])


def make_sample(seed: int, split: str, index: int, relation_rule: str = DEFAULT_RELATION_RULE) -> dict:
    """One sample as a plain dict (image as PNG bytes), fully determined by its arguments.

    `relation_rule` says which relation its text states for a pair apart on both axes
    (`world.RELATION_RULES`); the scene and image do not depend on it."""
    rng = _sample_rng(seed, split, index)
    allow = ALLOWS_UNSEEN[split]
    scene = sample_scene(rng, allow_unseen=allow)
    qa = questions(scene, rng, allow_unseen=allow, rule=relation_rule)
    return {
        "id": f"{split}-{index:06d}",
        "image": {"bytes": png_bytes(render(scene)), "path": None},
        "captions": captions(scene, relation_rule),
        "objects": scene.to_dict()["objects"],
        "questions": [q["question"] for q in qa],
        "answers": [q["answer"] for q in qa],
        "question_types": [q["type"] for q in qa],
        "unseen": scene.unseen,
    }


def features():
    import datasets

    obj = {"shape": datasets.Value("string"), "color": datasets.Value("string"),
           "bbox": datasets.Sequence(datasets.Value("int32"), length=4)}
    return datasets.Features({
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "captions": datasets.Sequence(datasets.Value("string")),
        "objects": [obj],
        "questions": datasets.Sequence(datasets.Value("string")),
        "answers": datasets.Sequence(datasets.Value("string")),
        "question_types": datasets.Sequence(datasets.Value("string")),
        "unseen": datasets.Value("bool"),
    })


def generate_split(seed: int, split: str, num_samples: int, relation_rule: str = DEFAULT_RELATION_RULE):
    """A `datasets.Dataset` of `num_samples` ShapesWorld samples (`make_sample`)."""
    import datasets

    rows = [make_sample(seed, split, i, relation_rule) for i in range(num_samples)]
    columns = {k: [r[k] for r in rows] for k in features()}
    return datasets.Dataset.from_dict(columns, features=features())


def scene_of(row: dict) -> Scene:
    """The scene graph of a dataset row."""
    return Scene.from_dict({"objects": row["objects"]})


@dataclass
class Summary:
    num_samples: dict[str, int]
    unseen_fraction: dict[str, float]
    mean_objects: dict[str, float]
    questions_per_type: dict[str, int]

    def __str__(self) -> str:
        lines = [f"{'split':<6} {'samples':>8} {'unseen':>7} {'objects/img':>11}"]
        for s, n in self.num_samples.items():
            lines.append(f"{s:<6} {n:>8} {self.unseen_fraction[s]:>7.2f} {self.mean_objects[s]:>11.2f}")
        lines.append("questions: " + ", ".join(f"{k} {v}" for k, v in self.questions_per_type.items()))
        return "\n".join(lines)


def summarize(ds) -> Summary:
    """Counts per split of a `DatasetDict` (read without decoding images)."""
    from collections import Counter

    qtypes: Counter = Counter()
    n, unseen, objs = {}, {}, {}
    for name, split in ds.items():
        cols = split.select_columns(["objects", "unseen", "question_types"])
        n[name] = len(split)
        unseen[name] = float(np.mean(cols["unseen"])) if len(split) else 0.0
        objs[name] = float(np.mean([len(o) for o in cols["objects"]])) if len(split) else 0.0
        for t in cols["question_types"]:
            qtypes.update(t)
    return Summary(n, unseen, objs, dict(sorted(qtypes.items())))


def generate(out: str | Path, num_train: int, num_val: int, seed: int = 0,
             relation_rule: str = DEFAULT_RELATION_RULE):
    """Write `train` and `val` splits to `out` (`datasets.load_from_disk`-able); return them."""
    import datasets

    if num_train < 1 or num_val < 1:  # `datasets` cannot read back a split saved empty
        raise ValueError(f"sample counts must be >= 1, got num_train={num_train}, num_val={num_val}")
    if relation_rule not in RELATION_RULES:
        raise ValueError(f"data.relation_rule {relation_rule!r} is not one of {RELATION_RULES}")
    ds = datasets.DatasetDict({
        "train": generate_split(seed, "train", num_train, relation_rule),
        "val": generate_split(seed, "val", num_val, relation_rule),
    })
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    ds.save_to_disk(str(tmp))
    _replace_dir(tmp, out)
    return datasets.load_from_disk(str(out))


def _replace_dir(tmp: Path, out: Path) -> None:
    """Swap a finished directory into place so a crash never leaves a half-written dataset."""
    import shutil

    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
