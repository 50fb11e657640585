#!/usr/bin/env bash
# N nodes x 8 GPUs with torchrun's rendezvous. Run the same command on every node:
#   NNODES=4 MASTER_ADDR=node001 CONFIG=full-8b bash scripts/launch/torchrun_multi_node.sh
set -euo pipefail
CONFIG=${CONFIG:-full-8b}
NNODES=${NNODES:-4}
NPROC=${NPROC:-8}
MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR to the first node\'s hostname}
MASTER_PORT=${MASTER_PORT:-29500}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LAUNCH=(torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC" --rdzv_backend=c10d
        --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="blip3o-$CONFIG")

"${LAUNCH[@]}" -m blip3o_mini.cli extract --shards "${SHARDS:-data/BLIP3o-Pretrain-*/*.tar}" \
  --out "runs/$CONFIG/features" --config "$CONFIG" --dtype bfloat16
# the instruct stage's shards (data.instruct_shards), into a folder of their own
"${LAUNCH[@]}" -m blip3o_mini.cli extract --shards "${INSTRUCT:-data/BLIP3o-60k/*.tar}" \
  --out "runs/$CONFIG/features/instruct" --config "$CONFIG" --dtype bfloat16
# 4 nodes x 8 GPUs x 16 = 512: BLIP3-o's global batch without accumulation
"${LAUNCH[@]}" -m blip3o_mini.cli run --config "$CONFIG" \
  --devices "$NPROC" --num-nodes "$NNODES" --strategy deepspeed_stage_1 --precision bf16-mixed
