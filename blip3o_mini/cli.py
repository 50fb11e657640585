"""`blip3o-mini`: the command line. Each subcommand lives in `blip3o_mini/commands/<name>.py`
with `add_arguments(parser)` and `main(args)`; heavy imports stay inside `main` so `--help`
is instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> one-line help; the module blip3o_mini.commands.<name> implements it.
COMMANDS = {
    "run": "run the pipeline's stages (toy: data -> CLIP -> understanding -> generation -> eval)",
    "data": "generate ShapesWorld splits (and optionally WebDataset shards)",
    "generate": "generate an image from a text prompt with a trained pipeline",
    "geneval": "GenEval-mini: write prompts, render reference images, score an image folder",
    "describe": "parameter counts per component of a config's model (meta device, no download)",
    "extract": "write CLIP targets of WebDataset shards once, one .safetensors per shard (per rank)",
    "answer": "answer a question about an image with a run's understanding backbone",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip3o-mini", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"blip3o_mini.commands.{name.replace('-', '_')}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Offline by default: every weight this project needs is trained here or pre-downloaded.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args._main(args) or 0
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, no traceback
        print(f"blip3o-mini {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
