"""`run_pipeline` under DDP, for tests/test_shard_stages.py: every artifact written once, by rank 0.

    python tests/ddp_stage_script.py CONFIG RUN_DIR LOG_DIR

CONFIG sets `trainer: {devices: 2, strategy: ddp, accelerator: cpu}`: Lightning's launcher
re-runs this script in a second process when the generation stage calls `trainer.fit`, so both
processes go through the real stage functions, as under torchrun. Every file write
(`artifacts.atomic_write_bytes`, which every stage write goes through) and every `shutil.rmtree`
is logged with the writer's global rank to LOG_DIR/writes-<pid>.jsonl; each process ends by
recording the stage metrics `run_pipeline` returned to it in LOG_DIR/result-<rank>.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path


def log_calls(log: Path) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from blip3o_mini import artifacts

    def logged(fn, kind):
        def call(path, *args, **kwargs):
            with open(log, "a") as f:  # plain open: the log is not an artifact
                f.write(json.dumps({"rank": rank_zero_only.rank, "kind": kind, "path": str(path)}) + "\n")
            return fn(path, *args, **kwargs)

        return call

    artifacts.atomic_write_bytes = logged(artifacts.atomic_write_bytes, "write")
    shutil.rmtree = logged(shutil.rmtree, "rmtree")


def main(argv: list[str]) -> int:
    import torch

    from blip3o_mini.config import load_config
    from blip3o_mini.run import run_pipeline

    config, run_dir, log_dir = argv
    torch.set_num_threads(1)  # two processes share a small CPU
    log_calls(Path(log_dir) / f"writes-{os.getpid()}.jsonl")
    report = run_pipeline(load_config(config), run_dir)

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    result = {"rank": rank_zero_only.rank, "stages": report["stages"]}
    (Path(log_dir) / f"result-{rank_zero_only.rank}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
