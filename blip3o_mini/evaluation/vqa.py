"""Understanding metrics of any `Backbone` on ShapesWorld scenes: VQA exact match and caption
accuracy, seen and unseen compositions apart.

BLIP3-o reports its backbone's understanding benchmarks (VQAv2, MMMU, ...) unchanged by the
generation stage, because that stage freezes the backbone. ShapesWorld's counterpart is exact:
every question has a one-word answer computed from the scene graph, and a generated caption is
parsed back into a multiset of (colour, shape) objects (`parse_caption`) and compared with the
scene (`scene_counter`). Decoding is greedy and batched through `Backbone.answer`, so the same
function scores the toy backbone, Qwen2.5-VL, and the backbone again after stage 2.

"Seen" scenes contain only training compositions; "unseen" scenes hold at least one held-out
colour+shape pair (`HELD_OUT`), which the training split never shows.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from ..data import QUESTION_TYPES, parse_caption, scene_of
from ..data.text import scene_counter
from ..tokenizer import CAPTION_PROMPT


def normalize_answer(text: str) -> str:
    """Exact match ignores case, surrounding spaces and a trailing full stop."""
    return text.strip().lower().rstrip(".!").strip()


def _rate(hits: list[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


@dataclass
class UnderstandingResult:
    """Accuracies (fractions) on seen scenes, unseen apart; `None` where nothing was asked."""

    vqa_accuracy: float | None
    vqa_accuracy_unseen: float | None
    per_type: dict[str, float | None]  # seen scenes
    per_type_unseen: dict[str, float | None]
    per_num_objects: dict[int, float | None]  # seen scenes, by objects in the scene
    num_questions: int
    num_questions_unseen: int
    caption_accuracy: float | None = None
    caption_accuracy_unseen: float | None = None
    num_captions: int = 0
    seconds: float = 0.0
    mistakes: list[dict] = field(default_factory=list)  # the first wrong answers, to read

    def to_metrics(self) -> dict:
        """Flat keys for metrics.json: `vqa_accuracy`, `vqa_accuracy_color`, ..."""
        m = {"vqa_accuracy": self.vqa_accuracy, "vqa_accuracy_unseen": self.vqa_accuracy_unseen,
             "num_vqa_questions": self.num_questions, "num_vqa_questions_unseen": self.num_questions_unseen}
        m |= {f"vqa_accuracy_{t}": a for t, a in self.per_type.items()}
        m |= {f"vqa_accuracy_{t}_unseen": a for t, a in self.per_type_unseen.items()}
        m |= {f"vqa_accuracy_{n}_objects": a for n, a in self.per_num_objects.items()}
        if self.num_captions:
            m |= {"caption_accuracy": self.caption_accuracy,
                  "caption_accuracy_unseen": self.caption_accuracy_unseen, "num_captions": self.num_captions}
        return m | {"eval_seconds": round(self.seconds, 1)}

    def table(self) -> str:
        fmt = lambda a: "   -" if a is None else f"{a:.3f}"  # noqa: E731
        lines = [f"{'question type':<14} {'seen':>6} {'unseen':>6}"]
        for t in self.per_type:
            lines.append(f"{t:<14} {fmt(self.per_type[t]):>6} {fmt(self.per_type_unseen.get(t)):>6}")
        lines.append(f"{'all VQA':<14} {fmt(self.vqa_accuracy):>6} {fmt(self.vqa_accuracy_unseen):>6}"
                     f"   ({self.num_questions} / {self.num_questions_unseen} questions)")
        if self.num_captions:
            lines.append(f"{'caption':<14} {fmt(self.caption_accuracy):>6} {fmt(self.caption_accuracy_unseen):>6}")
        lines.append("seen, by objects in the scene: " + ", ".join(
            f"{n}: {fmt(a)}" for n, a in sorted(self.per_num_objects.items())))
        return "\n".join(lines)


def answer_pairs(answer, inputs: torch.Tensor, pairs: list[tuple[int, str]], batch_size: int,
                 max_new_tokens: int) -> list[str]:
    """Greedy answers to (input index, question) pairs, `batch_size` at a time. `answer` is
    `backbone.answer` with images as `inputs`, or `backbone.answer_features` with cached CLIP
    tokens (N, 64, D)."""
    out: list[str] = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        idx = torch.tensor([j for j, _ in chunk])
        out += answer(inputs[idx], [q for _, q in chunk], max_new_tokens=max_new_tokens)
    return out


def _split_columns(split, max_scenes: int | None, images: torch.Tensor | None):
    n = len(split) if max_scenes is None else min(max_scenes, len(split))
    cols = split.select(range(n)).select_columns(
        ["questions", "answers", "question_types", "objects", "unseen"]).to_dict()
    if images is None:
        from ..data.tensors import images_uint8

        images = images_uint8(split.select(range(n)))
    return n, cols, images[:n]


def vqa_accuracy(backbone, split, images: torch.Tensor | None = None, batch_size: int = 256,
                 max_scenes: int | None = None, max_new_tokens: int = 6,
                 captions: bool = False, caption_tokens: int = 40) -> UnderstandingResult:
    """Exact-match VQA accuracy of `backbone` on a ShapesWorld split (e.g. `ds["val"]`), per
    question type and object count, seen and unseen apart; with `captions=True` also caption
    accuracy. `images` (N, 3, H, W) uint8 skips decoding the split's PNGs."""
    if max_scenes is not None and max_scenes <= 0:
        raise ValueError(f"max_scenes must be positive, got {max_scenes}")
    start = time.perf_counter()
    was_training = backbone.training
    backbone.eval()
    n, cols, images = _split_columns(split, max_scenes, images)
    pairs, meta = [], []
    for i in range(n):
        for q, a, t in zip(cols["questions"][i], cols["answers"][i], cols["question_types"][i]):
            pairs.append((i, q))
            meta.append((i, a, t))
    predictions = answer_pairs(backbone.answer, images, pairs, batch_size, max_new_tokens)

    hits: dict[tuple[bool, str], list[bool]] = defaultdict(list)
    by_count: dict[int, list[bool]] = defaultdict(list)
    mistakes = []
    for (i, gold, qtype), (_, q), pred in zip(meta, pairs, predictions):
        ok = normalize_answer(pred) == normalize_answer(gold)
        unseen = cols["unseen"][i]
        hits[unseen, qtype].append(ok)
        hits[unseen, "all"].append(ok)
        if not unseen:
            by_count[len(cols["objects"][i])].append(ok)
        if not ok and len(mistakes) < 50:
            mistakes.append({"scene": i, "question": q, "answer": gold, "predicted": pred, "type": qtype,
                             "unseen": unseen})
    types = [t for t in QUESTION_TYPES]
    result = UnderstandingResult(
        _rate(hits[False, "all"]), _rate(hits[True, "all"]),
        {t: _rate(hits[False, t]) for t in types}, {t: _rate(hits[True, t]) for t in types},
        {k: _rate(v) for k, v in sorted(by_count.items())},
        len(hits[False, "all"]), len(hits[True, "all"]), mistakes=mistakes)
    if captions:
        cap = caption_accuracy(backbone, split, images, batch_size, n, caption_tokens)
        result.caption_accuracy, result.caption_accuracy_unseen, result.num_captions = cap
    backbone.train(was_training)
    result.seconds = time.perf_counter() - start
    return result


def caption_accuracy(backbone, split, images: torch.Tensor | None = None, batch_size: int = 256,
                     max_scenes: int | None = None, max_new_tokens: int = 40) -> tuple:
    """(seen accuracy, unseen accuracy, number of scenes): a caption is right when the objects
    it names (`parse_caption`, colours included) are exactly the scene's."""
    n, cols, images = _split_columns(split, max_scenes, images)
    texts = answer_pairs(backbone.answer, images, [(i, CAPTION_PROMPT) for i in range(n)], batch_size,
                         max_new_tokens)
    hits: dict[bool, list[bool]] = defaultdict(list)
    for i, text in enumerate(texts):
        scene = scene_of({"objects": cols["objects"][i]})
        hits[cols["unseen"][i]].append(parse_caption(text) == scene_counter(scene))
    return _rate(hits[False]), _rate(hits[True]), n
