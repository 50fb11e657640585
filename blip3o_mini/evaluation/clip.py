"""How good is the toy CLIP encoder? Zero-shot classification and retrieval on held-out scenes.

The checks CLIP papers report, on the val split (never trained on):

- zero-shot colour / shape accuracy, on every val image with exactly one object (its colour
  and shape are then unambiguous), reported on seen compositions and, separately, on the
  held-out (unseen) compositions, as DESIGN.md asks of every evaluation. Each class is a text embedding, CLIP-style:
  colour c = the prompt ensemble "a photo of a {c} {shape}" averaged over the three shapes
  (colour alone never occurs in a caption, so the other attribute is marginalised out, as
  CLIP's prompt ensembling does); shape s = "a photo of a {s}" (ShapesWorld's colour-free
  caption form). The prediction is the class with the highest cosine similarity.
- image-to-caption recall@1 among 64 candidates: the val images in row order are cut into
  groups of 64 (a trailing partial group is dropped); each image ranks the canonical captions
  of its group; a hit is a top-1 caption whose text equals the image's own caption (two
  scenes with identical captions are indistinguishable by text, so either counts).

Shape glossary: N images, C classes, E embedding dim.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..data.tensors import images_uint8
from ..data.text import with_article
from ..data.world import COLORS, HELD_OUT, SHAPES
from ..vision import ClipEncoder

RETRIEVAL_GROUP = 64


def color_prompts(color: str) -> list[str]:
    return [f"a photo of {with_article(color)} {shape}" for shape in SHAPES]


def shape_prompts(shape: str) -> list[str]:
    return [f"a photo of {with_article(shape)}"]


@dataclass
class ClipMetrics:
    zero_shot_color_acc: float  # single-object images of seen compositions
    zero_shot_shape_acc: float
    zero_shot_color_acc_unseen: float  # single-object images of held-out compositions only
    zero_shot_shape_acc_unseen: float
    recall_at_1: float
    num_single_object: int  # seen compositions
    num_unseen_single_object: int
    num_retrieval_queries: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (f"zero-shot colour {self.zero_shot_color_acc:.3f} / shape {self.zero_shot_shape_acc:.3f} "
                f"on {self.num_single_object} single-object val images of seen compositions (unseen: colour "
                f"{self.zero_shot_color_acc_unseen:.3f}, shape {self.zero_shot_shape_acc_unseen:.3f}, "
                f"n={self.num_unseen_single_object}); image->caption R@1 among {RETRIEVAL_GROUP}: "
                f"{self.recall_at_1:.3f} ({self.num_retrieval_queries} queries)")


@torch.inference_mode()
def class_embeddings(encoder: ClipEncoder, prompts_per_class: list[list[str]]) -> torch.Tensor:
    """(C, E) unit class embeddings: the normalised mean of each class's prompt embeddings."""
    out = []
    for prompts in prompts_per_class:
        emb = encoder.encode_text(prompts).mean(0)  # (E,)
        out.append(emb / emb.norm())
    return torch.stack(out)  # (C, E)


@torch.inference_mode()
def image_embeddings(encoder: ClipEncoder, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([encoder.encode_image(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def zero_shot_predictions(encoder: ClipEncoder, images: torch.Tensor) -> tuple[list[str], list[str]]:
    """Predicted (colour, shape) names for each (N, 3, H, W) uint8 image."""
    img = image_embeddings(encoder, images)  # (N, E)
    colors = class_embeddings(encoder, [color_prompts(c) for c in COLORS])  # (6, E)
    shapes = class_embeddings(encoder, [shape_prompts(s) for s in SHAPES])  # (3, E)
    return ([COLORS[i] for i in (img @ colors.T).argmax(1).tolist()],
            [SHAPES[i] for i in (img @ shapes.T).argmax(1).tolist()])


def recall_at_1(encoder: ClipEncoder, images: torch.Tensor, captions: list[str],
                group: int = RETRIEVAL_GROUP) -> tuple[float, int]:
    """Image -> caption recall@1 within consecutive groups of `group` (score, queries)."""
    n = len(images) // group * group
    if n == 0:
        raise ValueError(f"recall@1 needs at least {group} images, got {len(images)}")
    img = image_embeddings(encoder, images[:n])  # (n, E)
    with torch.inference_mode():
        txt = torch.cat([encoder.encode_text(captions[i:i + 256]) for i in range(0, n, 256)])  # (n, E)
    hits = 0
    for g in range(0, n, group):
        best = (img[g:g + group] @ txt[g:g + group].T).argmax(1)  # (group,)
        hits += sum(captions[g + int(j)] == captions[g + i] for i, j in enumerate(best))
    return hits / n, n


def evaluate_clip(encoder: ClipEncoder, split) -> ClipMetrics:
    """All metrics on a ShapesWorld `datasets` split (the val split for held-out numbers)."""
    encoder.eval()
    objects = split["objects"]
    images = images_uint8(split)
    single = [i for i, objs in enumerate(objects) if len(objs) == 1]
    if not single:
        raise ValueError("the split has no single-object scene; zero-shot accuracy needs some")
    pred_c, pred_s = zero_shot_predictions(encoder, images[single])
    truth = [(objects[i][0]["color"], objects[i][0]["shape"]) for i in single]
    ok_c = [p == t[0] for p, t in zip(pred_c, truth)]
    ok_s = [p == t[1] for p, t in zip(pred_s, truth)]
    unseen = [k for k, t in enumerate(truth) if t in HELD_OUT]
    seen = [k for k, t in enumerate(truth) if t not in HELD_OUT]
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")  # noqa: E731
    r1, n = recall_at_1(encoder, images, [c[0] for c in split["captions"]])
    return ClipMetrics(
        zero_shot_color_acc=mean([ok_c[k] for k in seen]), zero_shot_shape_acc=mean([ok_s[k] for k in seen]),
        zero_shot_color_acc_unseen=mean([ok_c[k] for k in unseen]),
        zero_shot_shape_acc_unseen=mean([ok_s[k] for k in unseen]),
        recall_at_1=r1, num_single_object=len(seen), num_unseen_single_object=len(unseen),
        num_retrieval_queries=n)
