"""When does each question type get learned? The held-out answer loss per type of one or more
understanding stages trained with `understanding.train.type_loss_every`, side by side.

    python scripts/type_loss_curves.py ~/.cache/blip3o-mini/runs/toy-vqa RUN_DIR2 ... --type relation
    python scripts/type_loss_curves.py RUN_DIR --png type_loss.png   # every type of every run

Prints one column per run (the loss of `--type` at each recorded step) and the step at which it
first falls below half of chance, where chance for a yes / no type is ln 2 / 2 (the answer word and
its trivial end of turn). Relation leaves chance as a sudden drop in some runs and never in others
(docs/status.md, "Per stage").
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CHANCE = {"relation": math.log(2) / 2, "existence": math.log(2) / 2}


def load(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    path = run_dir.expanduser() / "understanding" / "type_loss_history.json"
    if not path.exists():
        raise SystemExit(f"{path} not found: train the understanding stage with understanding.train.type_loss_every")
    return {t: [tuple(x) for x in h] for t, h in json.loads(path.read_text()).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--type", default="relation", help="question type whose columns are printed")
    p.add_argument("--png", type=Path, help="also plot every type of every run")
    args = p.parse_args()
    curves = {str(d): load(d) for d in args.run_dirs}
    steps = sorted({s for c in curves.values() for s, _ in c.get(args.type, [])})
    print(f"held-out {args.type} answer loss (chance {CHANCE.get(args.type, float('nan')):.3f})")
    print("step  " + "  ".join(Path(d).name.rjust(10) for d in curves))
    for step in steps:
        row = [dict(c.get(args.type, [])).get(step) for c in curves.values()]
        print(f"{step:4d}  " + "  ".join("-".rjust(10) if v is None else f"{v:10.3f}" for v in row))
    if args.type in CHANCE:
        for d, c in curves.items():
            below = [s for s, v in c.get(args.type, []) if v < CHANCE[args.type] / 2]
            print(f"{Path(d).name}: below half of chance from step {below[0] if below else 'never'}")
    if args.png:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False, sharey=True)
        for ax, (d, c) in zip(axes[0], curves.items()):
            for t, h in c.items():
                ax.plot([s for s, _ in h], [v for _, v in h], label=t)
            ax.axhline(math.log(2) / 2, color="grey", ls=":", lw=1)
            ax.set(title=Path(d).name, xlabel="step", yscale="log")
        axes[0][0].set_ylabel("held-out answer loss")
        axes[0][-1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
