"""`blip3o-mini geneval {prompts,reference,score}`: GenEval-mini from the command line.

    blip3o-mini geneval prompts --out FILE
    blip3o-mini geneval reference --out DIR --samples-per-prompt K [--prompts FILE]
    blip3o-mini geneval score DIR
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    pr = sub.add_parser("prompts", help="write the GenEval-mini prompt metadata (JSONL)")
    pr.add_argument("--out", required=True, help="output .jsonl file")
    ref = sub.add_parser("reference", help="render ground-truth images for every prompt "
                                           "into GenEval's folder layout")
    ref.add_argument("--out", required=True, help="output directory (OUT/<00000>/samples/<0000>.png)")
    ref.add_argument("--samples-per-prompt", type=positive_int, default=4)
    ref.add_argument("--prompts", default=None,
                     help="metadata JSONL (default: the built-in GenEval-mini prompts)")
    ref.add_argument("--seed", type=non_negative_int, default=0)
    ref.add_argument("--overwrite", action="store_true", help="replace existing prompt folders")
    sc = sub.add_parser("score", help="score a GenEval-layout folder; writes DIR/results.json")
    sc.add_argument("dir", help="folder with <00000>/metadata.jsonl and <00000>/samples/*.png")


def main(args: argparse.Namespace) -> int:
    from blip3o_mini.evaluation import (make_prompts, read_prompts, reference_images,
                                        score_folder, write_geneval_folder, write_prompts)

    if args.action == "prompts":
        prompts = make_prompts()
        write_prompts(args.out, prompts)
        print(f"{len(prompts)} GenEval-mini prompts written to {args.out}")
    elif args.action == "reference":
        prompts = read_prompts(args.prompts) if args.prompts else make_prompts()
        write_geneval_folder(args.out, prompts, reference_images, args.samples_per_prompt,
                             seed=args.seed, overwrite=args.overwrite)
        print(f"{len(prompts) * args.samples_per_prompt} reference images for {len(prompts)} "
              f"prompts written to {args.out}")
    else:
        result = score_folder(args.dir)
        print(result.table())
        print(f"results written to {args.dir}/results.json")
    return 0
