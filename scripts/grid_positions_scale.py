"""How loud are the understanding backbone's grid positions? The scale of the row and column
embeddings (`understanding.backbone.grid_positions`) beside the projected CLIP tokens they are
added to, for one or more finished runs.

    python scripts/grid_positions_scale.py ~/.cache/blip3o-mini/runs/toy-vqa RUN_DIR2 ...

Prints per run the std of the projected tokens of 64 validation images, the std of the row and
column tables, and the tokens' std over the tables'. Started at std 0.02 (`grid_init: random`)
they stay ~30x below the tokens through a toy run (docs/status.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    args = p.parse_args()

    from blip3o_mini.backbone import GridPositions, ToyBackbone
    from blip3o_mini.features import load_split_features

    for run in (d.expanduser() for d in args.run_dirs):
        bb = ToyBackbone.load(run / "understanding" / "backbone")
        if not isinstance(bb.positions, GridPositions):
            print(f"{run.name}: no grid positions (understanding.backbone.grid_positions: false)")
            continue
        with torch.no_grad():
            tokens = bb.projector(load_split_features(run / "clip", "val")[:64])  # (64, N, H)
        row, col = bb.positions.row_embed.detach(), bb.positions.col_embed.detach()  # (G, H) each
        ratio = float(tokens.std() / torch.cat([row, col]).std())
        print(f"{run.name}: projected tokens std {tokens.std():.3f}, row embeddings std {row.std():.3f}, "
              f"column embeddings std {col.std():.3f}: the tokens are {ratio:.1f}x louder")


if __name__ == "__main__":
    main()
