"""Whether a recipe compiles its model with `torch.compile` (a speed setting, `compile:` in a
recipe's `train:` section): `true`, `false`, or `auto`, which compiles where a compiler is
found and runs eagerly elsewhere, so one config serves a laptop without one.

Three recipes read it: `generation.train.compile` (the DiT's training forward and the frozen
LM's pass that makes Q), `understanding.train.compile` (the LM's training forward) and
`decoder.train.compile` (the UNet's training forward). Why it pays on CPU: the toy NextDiT's
matrices are 128 wide and the toy LM's 256, so their steps are mostly elementwise work (adaLN
modulation, RMSNorms, RoPE, SwiGLU, tanh gates, masks, autocast's dtype copies), one small
kernel each. Inductor fuses them into a few C++ loops (`python benchmarks/bench_dit.py --size
toy-config --dtype bf16 --batch 64 --attention auto --compile`; `python
benchmarks/bench_understanding_step.py --compile`; `python benchmarks/bench_decoder_step.py
--compile`). The first step pays the compilation (about three minutes for the DiT, one for the
LM, two for the UNet, on the 2-core toy machine); Inductor caches it on disk
(/tmp/torchinductor_$USER), so the next run starts in seconds. That cache does not tell the
attention kernels apart (`trainer.attention`): a graph compiled under one is served under the
other, correct but at the other's speed, so clear it after switching kernels.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib.util import find_spec


SPEED_KEYS = ("compile",)  # `train:` keys that change how fast a stage trains, not what it learns


def without_speed_keys(section: dict) -> dict:
    """A stage's config section less its `train:` speed keys: what the stage's fingerprint
    hashes, so switching `compile` keeps a trained stage. A `train:` left empty goes too: a
    section that only sets `compile` hashes like no section at all."""
    out = dict(section)
    if "train" in section:
        out["train"] = {k: v for k, v in (section["train"] or {}).items() if k not in SPEED_KEYS}
        if not out["train"]:
            del out["train"]
    return out


def check_compile(setting, name: str = "compile") -> None:
    """A one-line error for a value that is not true, false or auto."""
    if not isinstance(setting, bool) and setting != "auto":
        raise ValueError(f"{name} must be true, false or auto, got {setting!r}")


def compiler_found(cuda: bool) -> bool:
    """Inductor's code generators: Triton for CUDA, a C++ compiler (the one Inductor calls:
    $CXX, else g++, clang++ on macOS) for CPU."""
    if cuda:
        return find_spec("triton") is not None
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")) is not None


def use_compile(setting, cuda: bool | None = None) -> bool:
    """Resolve a `compile:` setting: `auto` compiles when `compiler_found` for the device the
    job will run on (CUDA when available, unless `cuda` says otherwise)."""
    check_compile(setting)
    if setting != "auto":
        return setting
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    return compiler_found(cuda)
