#!/usr/bin/env bash
# Two CPU processes with torchrun (gloo): stage 2 on a tiny model, checked against one process
# by tests/test_scaling.py. Writes OUT/result.json (losses per step) and the weights.
#   bash scripts/launch/cpu_ddp_demo.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/ddp_demo}
torchrun --standalone --nproc_per_node=2 tests/ddp_script.py "$OUT" --devices 2
python -c "import json, sys; r = json.load(open(sys.argv[1])); print('world size', r['world_size'], '| loss per step', [round(l, 3) for _, l in r['losses_full']])" "$OUT/result.json"
