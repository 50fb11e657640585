"""Ground-truth images for GenEval-mini prompts: ShapesWorld scenes that satisfy a prompt,
rendered by the world's own renderer. They are the "perfect generator" that calibrates the
detector and the scorer (a correct evaluator must score them about 1.0).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..data.world import COLORS, HELD_OUT, Scene, place_objects, relation, render
from .prompts import relative_position

MAX_TRIES = 1000


def reference_scene(metadata: dict, rng: np.random.Generator) -> Scene:
    """A random scene with exactly the prompt's objects (and its position, if any).

    Entries without a colour take a random colour that is no held-out composition; a position
    must hold under both ShapesWorld's relation (so the scene's caption says it) and GenEval's.
    """
    include = metadata["include"]
    for _ in range(MAX_TRIES):
        kinds, owner = [], []  # (colour, shape) per object, and its include index
        for i, e in enumerate(include):
            for _ in range(e["count"]):
                color = e.get("color") or _seen_color(e["class"], rng)
                kinds.append((color, e["class"]))
                owner.append(i)
        scene = place_objects(rng, kinds)
        if scene is not None and _positions_hold(scene, owner, include):
            return scene
    raise ValueError(f"could not place a scene for prompt {metadata['prompt']!r} in {MAX_TRIES} tries")


def _seen_color(shape: str, rng: np.random.Generator) -> str:
    colors = [c for c in COLORS if (c, shape) not in HELD_OUT]
    return colors[int(rng.integers(len(colors)))]


def _positions_hold(scene: Scene, owner: list[int], include: list[dict]) -> bool:
    for i, e in enumerate(include):
        if "position" not in e:
            continue
        rel, target = e["position"]
        group = [o for o, k in zip(scene.objects, owner) if k == i]
        targets = [o for o, k in zip(scene.objects, owner) if k == target]
        for a in group:
            for b in targets:
                if relation(a, b) != rel or rel not in relative_position(a.bbox, b.bbox):
                    return False
    return True


def reference_images(batch: list[dict], seed: int) -> list[Image.Image]:
    """A `generate_fn` for `write_geneval_folder`: renders a reference scene per entry.

    Entry k of a batch is seeded by `(seed, k)`, so with one prompt per batch a sample depends
    only on its prompt index and sample index.
    """
    return [render(reference_scene(m, np.random.default_rng([seed, k]))) for k, m in enumerate(batch)]
