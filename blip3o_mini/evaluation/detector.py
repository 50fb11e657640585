"""A rule-based object detector for ShapesWorld-like images: GenEval-mini's stand-in for the
Mask2Former detector + CLIP colour classifier that GenEval (Ghosh et al. 2023) runs on photos.

Three steps, each robust to the blur and colour noise of generated images:

1. **Colour per pixel.** A pixel that is a palette colour `c` blended with the white background
   is `p = a*c + (1-a)*white`, so its *ink* `white - p = a*(white - c)` lies on the line through
   0 and `white - c`. Each pixel takes the palette colour whose ink line is nearest (the distance
   threshold `max_color_dist` rejects colours that are no palette colour) and counts as
   foreground when its ink amount `a >= fg_alpha`. Blurred edges keep their colour; white stays
   background. Because blur keeps colours on their lines, the image is first smoothed lightly
   (`smooth_sigma`) to average pixel noise down, and the colour map is then cleaned by a 3x3
   majority vote (isolated wrong pixels, pinholes).
2. **Connected components** (4-connected) of the foreground, dropping specks under `min_area`
   pixels. A component's colour is its pixels' majority; a component that is two colours
   (objects that touch) is split by colour.
3. **Shape** from the component's mask in its bounding box: upright triangles are narrow at the
   top (`taper` = top-third width / bottom-third width), squares fill their box
   (`fill` ~ 1), circles fill pi/4 of it.

Shape glossary: H, W image height/width (64); P palette size (6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..data.world import COLORS, IMAGE_SIZE, PALETTE


@dataclass
class DetectorConfig:
    """Thresholds of the detector; the defaults are calibrated on ShapesWorld renders
    (clean, blurred with sigma 1 px, noisy with std 10/255): see `evaluation.calibrate`."""

    smooth_sigma: float = 0.7  # px; a light Gaussian first averages pixel noise down (~2.5x)
    fg_alpha: float = 0.5  # ink fraction above which a pixel is foreground
    max_color_dist: float = 60.0  # max RGB distance (0-255) from a palette colour's ink line
    min_area: int = 24  # px; smaller components are noise (smallest object: ~70 px triangle)
    split_fraction: float = 0.3  # a second colour holding this share of a component splits it
    triangle_taper: float = 0.6  # top/bottom width below this -> triangle
    square_fill: float = 0.88  # bbox fill at or above this -> square, else circle
    image_size: int = IMAGE_SIZE  # images of another size are resized to this first


@dataclass(frozen=True)
class Detection:
    """One detected object; `bbox = (x0, y0, x1, y1)` with x1/y1 exclusive, as `world.Obj`."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    fill: float  # area / bbox area
    taper: float  # mean width of the top third / of the bottom third

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "bbox": list(self.bbox),
                "area": self.area, "fill": round(self.fill, 3), "taper": round(self.taper, 3)}


_WHITE = 255.0
_INK = np.array([[_WHITE - v for v in PALETTE[c]] for c in COLORS], dtype=np.float64)  # (P, 3)
_INK_NORM2 = (_INK**2).sum(1)  # (P,)


def to_array(image, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PIL image or (H, W, 3) uint8 array -> (size, size, 3) float64 RGB in [0, 255]."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        image = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), mode="RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or an (H, W, 3) array, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64)


def gaussian_filter(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian filter of an (H, W, C) array (edge padding) -> (H, W, C) float64."""
    out = image.astype(np.float64)
    if sigma <= 0:
        return out
    r = int(np.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma**2))
    k /= k.sum()  # (2r+1,)
    H, W = out.shape[:2]
    padded = np.pad(out, ((r, r), (0, 0), (0, 0)), mode="edge")  # (H+2r, W, C)
    out = sum(w * padded[i:i + H] for i, w in enumerate(k))
    padded = np.pad(out, ((0, 0), (r, r), (0, 0)), mode="edge")  # (H, W+2r, C)
    return sum(w * padded[:, i:i + W] for i, w in enumerate(k))


def classify_pixels(rgb: np.ndarray, cfg: DetectorConfig) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W) int: palette index + 1 per foreground pixel, 0 for background."""
    ink = _WHITE - rgb  # (H, W, 3)
    proj = ink @ _INK.T  # (H, W, P)
    alpha = proj / _INK_NORM2  # (H, W, P) ink amount along each colour's line
    # squared distance to each line (Pythagoras: |ink|^2 - |projection|^2)
    dist2 = (ink**2).sum(-1, keepdims=True) - proj * alpha  # (H, W, P)
    best = dist2.argmin(-1)  # (H, W)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]  # (H, W)
    best_dist2 = np.take_along_axis(dist2, best[..., None], -1)[..., 0]  # (H, W)
    foreground = (best_alpha >= cfg.fg_alpha) & (best_dist2 <= cfg.max_color_dist**2)
    return np.where(foreground, best + 1, 0)


def majority_filter(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Each pixel takes the most frequent class of its 3x3 neighbourhood (ties: the lowest
    class, background first): removes isolated misclassified pixels, holes and spurs."""
    H, W = classes.shape
    onehot = np.pad(classes, 1, mode="edge")[None] == np.arange(num_classes)[:, None, None]  # (C, H+2, W+2)
    votes = sum(onehot[:, dy:dy + H, dx:dx + W].astype(np.int8) for dy in range(3) for dx in range(3))
    return votes.argmax(0)  # (H, W)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (H, W) mask -> (labels (H, W) in 0..n, n).

    Vectorised label propagation: a pixel's label is the index of a pixel of its component;
    every pass takes the smallest label among the pixel and its 4 neighbours, then jumps to the
    label of the pixel its label points at, until nothing changes.
    """
    H, W = mask.shape
    big = H * W  # background; labels of foreground pixels are flat pixel indices
    labels = np.where(mask, np.arange(H * W).reshape(H, W), big)  # (H, W)
    while True:
        low = labels.copy()
        low[1:] = np.minimum(low[1:], labels[:-1])
        low[:-1] = np.minimum(low[:-1], labels[1:])
        low[:, 1:] = np.minimum(low[:, 1:], labels[:, :-1])
        low[:, :-1] = np.minimum(low[:, :-1], labels[:, 1:])
        low = np.where(mask, np.append(low.ravel(), big)[low], big)  # pointer jumping
        if np.array_equal(low, labels):
            break
        labels = low
    roots, dense = np.unique(labels, return_inverse=True)
    dense = dense.reshape(H, W)  # 0..len(roots)-1, the background (big) sorts last
    n = int((roots < big).sum())
    return np.where(mask, dense + 1, 0), n


def shape_features(mask: np.ndarray) -> tuple[tuple[int, int, int, int], float, float]:
    """bbox, fill ratio and top/bottom taper of one object's boolean (H, W) mask."""
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    crop = mask[y0:y1, x0:x1]  # (h, w)
    h = y1 - y0
    fill = float(crop.sum()) / crop.size
    widths = crop.sum(1)  # (h,) pixels per row
    third = max(h // 3, 1)
    taper = float(widths[:third].mean()) / max(float(widths[-third:].mean()), 1.0)
    return (x0, y0, x1, y1), fill, taper


def classify_shape(fill: float, taper: float, cfg: DetectorConfig) -> str:
    if taper < cfg.triangle_taper:
        return "triangle"
    return "square" if fill >= cfg.square_fill else "circle"


def _objects_in(mask: np.ndarray, colors: np.ndarray, cfg: DetectorConfig) -> list[Detection]:
    """Detections in one connected component (`colors`: the (H, W) palette map)."""
    votes = np.bincount(colors[mask], minlength=len(COLORS) + 1)[1:]  # (P,)
    order = np.argsort(-votes)
    second = votes[order[1]]
    if second >= cfg.min_area and second >= cfg.split_fraction * mask.sum():
        out = []  # objects of two colours touch: one object per single-colour region
        for k in order[votes[order] >= cfg.min_area]:
            sub_labels, n = label_components(mask & (colors == k + 1))
            parts = [sub_labels == i for i in range(1, n + 1)]
            out += [_single(part, int(k), cfg) for part in parts if part.sum() >= cfg.min_area]
        return out
    return [_single(mask, int(order[0]), cfg)]


def _single(mask: np.ndarray, color: int, cfg: DetectorConfig) -> Detection:
    bbox, fill, taper = shape_features(mask)
    return Detection(classify_shape(fill, taper, cfg), COLORS[color], bbox, int(mask.sum()),
                     fill, taper)


def detect(image, cfg: DetectorConfig | None = None) -> list[Detection]:
    """Objects in a ShapesWorld-like image, largest first (GenEval orders by confidence)."""
    cfg = cfg or DetectorConfig()
    rgb = to_array(image, cfg.image_size)  # (H, W, 3)
    rgb = gaussian_filter(rgb, cfg.smooth_sigma)  # (H, W, 3) denoised
    colors = majority_filter(classify_pixels(rgb, cfg), len(COLORS) + 1)  # (H, W)
    labels, n = label_components(colors > 0)
    found: list[Detection] = []
    for i in range(1, n + 1):
        mask = labels == i
        if mask.sum() >= cfg.min_area:
            found += _objects_in(mask, colors, cfg)
    return sorted(found, key=lambda d: (-d.area, d.bbox))
