"""Calibration of GenEval-mini before it scores any model (DESIGN.md section 3): a perfect
generator (reference renders) must score about 1.0, wrong pairings about chance, and images
degraded the way generated images are (Gaussian blur, pixel noise) must still score high.

GenEval itself was validated against human judgements (83% agreement); here the ground truth
is exact, so the evaluator is validated against the scene graphs instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from ..data.world import Scene, render
from .detector import DetectorConfig, detect, gaussian_filter
from .prompts import make_prompts
from .reference import reference_scene
from .score import GenEvalResult, score_images

CONDITIONS = ("clean", "shuffled", "blurred", "noisy", "blurred_noisy")


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an (H, W, 3) uint8 image (edge padding) -> (H, W, 3) uint8."""
    return np.clip(np.round(gaussian_filter(image, sigma)), 0, 255).astype(np.uint8)


def add_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add Gaussian pixel noise of `std` (in [0, 1] intensity units) to an (H, W, 3) uint8 image."""
    noisy = image.astype(np.float64) + rng.normal(0.0, std * 255.0, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


@dataclass
class Calibration:
    """Overall scores per condition, and how often detection recovers a scene exactly."""

    results: dict[str, GenEvalResult]  # CONDITIONS -> result
    detection_exact: dict[str, float]  # clean/blurred/noisy/blurred_noisy -> fraction of images
    num_images: int

    def overall(self) -> dict[str, float]:
        return {c: r.overall for c, r in self.results.items()}

    def table(self) -> str:
        fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines = [f"{'condition':<14} {'overall':>7} {'seen':>6} {'unseen':>6} {'exact det.':>10}"]
        for c, r in self.results.items():
            det = self.detection_exact.get(c)
            lines.append(f"{c:<14} {r.overall:>7.3f} {fmt(r.seen):>6} {fmt(r.unseen):>6} "
                         f"{'' if det is None else f'{det:.3f}':>10}")
        return "\n".join(lines)


def degrade(images: list[np.ndarray], condition: str, blur_sigma: float, noise_std: float,
            seed: int = 0) -> list[np.ndarray]:
    """The images of one calibration condition ("clean", "blurred", "noisy", "blurred_noisy")."""
    rng = np.random.default_rng([seed, CONDITIONS.index(condition)])
    if condition in ("blurred", "blurred_noisy"):
        images = [gaussian_blur(im, blur_sigma) for im in images]
    if condition in ("noisy", "blurred_noisy"):
        images = [add_noise(im, noise_std, rng) for im in images]
    return list(images)


def same_objects(detections: list, scene: Scene) -> bool:
    """Whether detections (`Detection`s or their dicts) are exactly the scene's (colour, shape)
    multiset."""
    found = Counter((d["color"], d["shape"]) if isinstance(d, dict) else (d.color, d.shape)
                    for d in detections)
    return found == Counter((o.color, o.shape) for o in scene.objects)


def exact_fraction(images: list, scenes: list[Scene], cfg: DetectorConfig | None = None) -> float:
    """Fraction of images whose detections are exactly their scene's objects."""
    return float(np.mean([same_objects(detect(im, cfg), s) for im, s in zip(images, scenes)]))


def calibrate(
    prompts: list[dict] | None = None,
    samples_per_prompt: int = 1,
    seed: int = 0,
    blur_sigma: float = 1.0,
    noise_std: float = 10 / 255,
    cfg: DetectorConfig | None = None,
) -> Calibration:
    """Score reference renders of `prompts` (default: all GenEval-mini prompts) clean, against
    shuffled prompts, blurred, noisy, and both; return the scores and detector exactness."""
    prompts = prompts if prompts is not None else make_prompts()
    metas = [m for m in prompts for _ in range(samples_per_prompt)]
    scenes = [reference_scene(m, np.random.default_rng([seed, i])) for i, m in enumerate(metas)]
    clean = [np.asarray(render(s)) for s in scenes]  # each (64, 64, 3) uint8
    shuffled = [metas[i] for i in np.random.default_rng([seed, 99]).permutation(len(metas))]
    results, exact = {}, {}
    for condition in CONDITIONS:
        if condition == "shuffled":
            results[condition] = score_images(clean, shuffled, cfg)
            continue
        images = degrade(clean, condition, blur_sigma, noise_std, seed)
        results[condition] = score_images(images, metas, cfg)
        exact[condition] = float(np.mean([same_objects(r["detections"], s)
                                          for r, s in zip(results[condition].records, scenes)]))
    return Calibration(results, exact, len(metas))

