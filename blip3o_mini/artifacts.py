"""Run directories and stage artifacts: every stage writes weights + config + metrics into
`RUN_DIR/<stage>/`, keyed by a fingerprint of its configuration (and of the stages it reads),
so a re-run skips finished stages and a changed config never serves stale results.

All writes are atomic (write to a temporary file, then `os.replace`): an interrupted run never
leaves a half-written checkpoint in place of a good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STAGE_FILE = "stage.json"


def fingerprint(*parts: Any) -> str:
    """Short, stable hash of JSON-serialisable parts (config sections, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (contiguous CPU copies of `tensors`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_tensors(path: str | Path) -> dict:
    """Load a safetensors file; refuse anything else (pickles can run code when loaded)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors checkpoints are loaded (pickle files can run "
                         "arbitrary code); convert it with safetensors.torch.save_file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found; train the stage first "
                                "(blip3o-mini run) or point to an existing run directory")
    return load_file(str(path))


def stage_complete(stage_dir: str | Path, key: str | None) -> bool:
    """True when `stage_dir` holds a finished stage whose fingerprint is `key` (None: any)."""
    f = Path(stage_dir) / STAGE_FILE
    if not f.exists():
        return False
    try:
        info = json.loads(f.read_text())
    except json.JSONDecodeError:
        return False
    return (key is None or info.get("key") == key) and info.get("complete") is True


def mark_complete(stage_dir: str | Path, key: str, **info: Any) -> None:
    """Written last, after every other artifact of the stage: its presence means 'finished'."""
    atomic_write_json(Path(stage_dir) / STAGE_FILE, {"key": key, "complete": True, **info})


def default_run_dir(config_run_dir: str = "runs/toy") -> Path:
    """The run directory notebooks and tests use: `$BLIP3O_MINI_RUN_DIR`, else the config's
    `run_dir` under the repository root (so a notebook finds the artifacts of `blip3o-mini run`)."""
    env = os.environ.get("BLIP3O_MINI_RUN_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / config_run_dir
