"""How well the pixel decoder reconstructs images from their CLIP features (BLIP3-o's stage-2
check: the decoder must carry what the features hold back into pixels).

Two views of the same decoded images:
- **pixels**: PSNR against the original render (punishes any shift or blur);
- **objects**: the GenEval-mini detector on the decoded image against the original scene graph:
  GenEval-mini correctness of the prompt built from the scene (`prompt_from_scene`: every
  colour+shape group with its exact count, and the relation of two objects), agreement of
  colours, shapes, counts and the exact (colour, shape) multiset, per-colour and per-shape
  recall (which objects get lost), and the centre / size error of matched objects in pixels.

Shape glossary: M images, H = W = 64.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..data.world import Scene
from .detector import detect
from .prompts import prompt_from_scene
from .score import GenEvalResult, score_images


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of uint8 images (M, 3, H, W) against (M, 3, H, W): (M,)."""
    mse = ((a.float() - b.float()) ** 2).mean((1, 2, 3)).clamp_min(1e-3)  # (M,)
    return 10 * torch.log10(255.0**2 / mse)


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]


@dataclass
class ReconstructionReport:
    psnr: float  # dB, mean over images
    geneval: GenEvalResult  # decoded images vs prompts of their scenes
    geneval_originals: GenEvalResult  # the originals themselves (the detector's ceiling)
    agreement: dict[str, float]  # colours / shapes / count / exact objects, fraction of images
    recall: dict[str, float]  # per colour and per shape: fraction of objects found
    center_error_px: float | None  # mean over objects matched one-to-one (None: no match)
    size_error_px: float | None
    per_image: list[dict]

    def metrics(self) -> dict:
        """The flat dict written to `RUN_DIR/decoder/metrics.json`."""
        g = self.geneval
        return {"reconstruction_geneval_mini": g.overall,
                "reconstruction_geneval_mini_per_tag": g.per_tag,
                "reconstruction_geneval_mini_seen": g.seen, "reconstruction_geneval_mini_unseen": g.unseen,
                "originals_geneval_mini": self.geneval_originals.overall,
                "psnr_db": self.psnr, "agreement": self.agreement, "recall": self.recall,
                "center_error_px": self.center_error_px, "size_error_px": self.size_error_px,
                "num_images": len(self.per_image)}


def _matched_errors(dets: list, scene: Scene) -> list[tuple[float, float]]:
    """(centre distance, mean side difference) for objects whose (colour, shape) is unique in
    both the scene and the detections."""
    gt = Counter((o.color, o.shape) for o in scene.objects)
    found = Counter((d.color, d.shape) for d in dets)
    out = []
    for o in scene.objects:
        k = (o.color, o.shape)
        if gt[k] == 1 and found[k] == 1:
            d = next(d for d in dets if (d.color, d.shape) == k)
            (ax, ay), (bx, by) = o.center, ((d.bbox[0] + d.bbox[2]) / 2, (d.bbox[1] + d.bbox[3]) / 2)
            side = lambda b: ((b[2] - b[0]) + (b[3] - b[1])) / 2  # noqa: E731
            out.append((float(np.hypot(ax - bx, ay - by)), abs(side(o.bbox) - side(d.bbox))))
    return out


def evaluate_reconstruction(decoded: torch.Tensor, originals: torch.Tensor,
                            scenes: list[Scene]) -> ReconstructionReport:
    """Score decoded uint8 images (M, 3, H, W) against the originals and their scene graphs."""
    if decoded.shape != originals.shape or len(scenes) != decoded.shape[0]:
        raise ValueError(f"decoded {tuple(decoded.shape)}, originals {tuple(originals.shape)} and "
                         f"{len(scenes)} scenes must describe the same images")
    prompts = [prompt_from_scene(s) for s in scenes]
    pil = _to_pil(decoded)
    geneval = score_images(pil, prompts)
    originals_score = score_images(_to_pil(originals), prompts)
    p = psnr(decoded, originals)  # (M,)
    per_image, errors = [], []
    hit: dict[str, list[bool]] = {}
    for i, (rec, scene) in enumerate(zip(geneval.records, scenes)):
        dets = detect(pil[i])
        got, want = Counter((d.color, d.shape) for d in dets), Counter((o.color, o.shape) for o in scene.objects)
        row = {"psnr": float(p[i]), "correct": rec["correct"], "reason": rec["reason"],
               "colors": Counter(d.color for d in dets) == Counter(o.color for o in scene.objects),
               "shapes": Counter(d.shape for d in dets) == Counter(o.shape for o in scene.objects),
               "count": len(dets) == len(scene.objects), "objects": got == want}
        per_image.append(row)
        for (color, shape), n in want.items():  # objects of the scene found in the decode
            found = min(n, got[(color, shape)])
            for key in (color, shape):
                hit.setdefault(key, []).extend([True] * found + [False] * (n - found))
        errors += _matched_errors(dets, scene)
    agreement = {k: float(np.mean([r[k] for r in per_image])) for k in ("colors", "shapes", "count", "objects")}
    recall = {k: float(np.mean(v)) for k, v in sorted(hit.items())}
    err = np.array(errors).mean(0).tolist() if errors else [None, None]  # (2,) centre, size
    return ReconstructionReport(float(p.mean()), geneval, originals_score, agreement, recall,
                                err[0], err[1], per_image)
