#!/usr/bin/env bash
# One node, 8 GPUs (edit NPROC): CLIP targets once, then the main job.
#   CONFIG=full-8b SHARDS='data/BLIP3o-Pretrain-*/*.tar' bash scripts/launch/torchrun_single_node.sh
set -euo pipefail
CONFIG=${CONFIG:-full-8b}
NPROC=${NPROC:-8}
SHARDS=${SHARDS:-"data/BLIP3o-Pretrain-Long-Caption/*.tar"}
FEATURES=${FEATURES:-runs/$CONFIG/features}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # weights pre-downloaded (see the config's header)

# 1. EVA-CLIP targets: each rank encodes its own shards (bf16 on disk: 229 KB per image)
torchrun --standalone --nproc_per_node="$NPROC" -m blip3o_mini.cli extract \
  --shards "$SHARDS" --out "$FEATURES" --config "$CONFIG" --dtype bfloat16 --batch-size 64
blip3o-mini extract --shards "$SHARDS" --out "$FEATURES" --config "$CONFIG" --check  # all done?
# the instruct stage's shards (data.instruct_shards), into a folder of their own
INSTRUCT=${INSTRUCT:-"data/BLIP3o-60k/*.tar"}
torchrun --standalone --nproc_per_node="$NPROC" -m blip3o_mini.cli extract \
  --shards "$INSTRUCT" --out "$FEATURES/instruct" --config "$CONFIG" --dtype bfloat16 --batch-size 64

# 2. training: 8 processes on this node; global batch = batch_size x 8 x accumulate
torchrun --standalone --nproc_per_node="$NPROC" -m blip3o_mini.cli run --config "$CONFIG" \
  --devices "$NPROC" --num-nodes 1 --strategy deepspeed_stage_1 --precision bf16-mixed \
  --accumulate-grad-batches 4   # 16 x 8 x 4 = 512 on one node
