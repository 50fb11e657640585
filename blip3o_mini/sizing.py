"""Memory per GPU and FLOPs per sample of a generation (stage 2) training step, from the
parameter counts and widths of `describe.describe(cfg)`. Estimates, not measurements: they say
which strategy fits on which GPU and what throughput to expect; `benchmarks/bench_full_step.py`
measures.

Memory: the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3.1): with bf16 mixed
precision and Adam, a trainable parameter costs 2 bytes (bf16 weight) + 2 (bf16 gradient) + 12
(fp32 master weight, Adam m and v). A strategy decides which of these are split across the N
GPUs of the data-parallel group:

    ddp                  nothing                           16 B/param on every GPU
    deepspeed_stage_1    optimiser states (ZeRO-1)         4 + 12/N   (BLIP3-o's choice)
    deepspeed_stage_2    + gradients (ZeRO-2)              2 + 14/N
    deepspeed_stage_3    + weights (ZeRO-3)                16/N
    fsdp                 everything (FULL_SHARD ~ ZeRO-3)  16/N

Frozen weights (the backbone; the CLIP tower when targets are encoded every step) cost 2 bytes
(bf16) and are split only by the fully sharded strategies.

Activations per sample (bf16, SDPA/flash attention so no s^2 score matrix is kept): per
transformer layer over s tokens of width h and MLP width f, about s * (18 h + 6 f) bytes (norm
and projection inputs, q/k/v, attention output, SwiGLU gate/up/product), in the spirit of
Korthikanti et al. 2022. The frozen backbone keeps its activations too, because gradients flow
through it to the query tokens; gradient checkpointing (DiT blocks) keeps only each block's
input (2 s h bytes) plus one block's activations during recomputation.

FLOPs: a matmul with a P-parameter weight costs 2 P FLOPs per token forward; backward costs 4 P
(gradients of inputs and of weights), or 2 P when the weight is frozen (inputs only). Attention
adds 4 s^2 h forward per layer (QK^T and AV, not halved for causal masks). Model FLOPs exclude
recomputation, so MFU compares runs with and without checkpointing fairly. With `targets:
images` the frozen CLIP tower also runs forward on every image (2 P FLOPs per image token).

Shape glossary: T backbone tokens per sample (prompt + [IMG] + Nq queries), N = 64 CLIP tokens,
h backbone width, L backbone layers, D DiT width, Nq query tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024 ** 3
# strategy -> (trainable weights, gradients, optimiser states, frozen weights) sharded?
SHARDING = {
    "ddp": (False, False, False, False),
    "deepspeed_stage_1": (False, False, True, False),
    "deepspeed_stage_2": (False, True, True, False),
    "deepspeed_stage_3": (True, True, True, True),
    "fsdp": (True, True, True, True),
}
BYTES_WEIGHT, BYTES_GRAD, BYTES_OPTIM, BYTES_FROZEN = 2, 2, 12, 2


@dataclass
class MemoryEstimate:
    """Bytes per GPU of one training step's resident state."""

    strategy: str
    num_gpus: int
    micro_batch: int
    weights: float  # trainable (bf16) + frozen (bf16)
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def gib(self) -> dict:
        out = {k: v / GIB for k, v in asdict(self).items() if k in ("weights", "gradients", "optimizer", "activations")}
        return out | {"total": self.total / GIB}


def layer_activation_bytes(tokens: int, width: int, ffn: int) -> float:
    """Activations one transformer layer keeps for backward, bf16: s * (18 h + 6 f) bytes."""
    return tokens * (18 * width + 6 * ffn)


def activation_bytes_per_sample(dims: dict, seq_len: int) -> dict:
    """{"backbone", "dit"} bytes one sample's activations take (see the module docstring)."""
    T, h, L = seq_len, dims["backbone_hidden"], dims["backbone_layers"]
    backbone = L * layer_activation_bytes(T, h, dims["backbone_ffn"])  # never checkpointed (frozen, eval mode)
    N, D, depth, Nq = dims["num_tokens"], dims["dit_dim"], dims["dit_depth"], dims["num_query_tokens"]
    block = layer_activation_bytes(N, D, dims["dit_ffn"]) + 6 * N * D + 4 * Nq * D  # + cross-attention
    dit = depth * 2 * N * D + block if dims["gradient_checkpointing"] else depth * block
    return {"backbone": float(backbone), "dit": float(dit)}


def memory_estimate(desc, strategy: str, num_gpus: int, micro_batch: int, seq_len: int = 192,
                    targets: str | None = None) -> MemoryEstimate:
    """Per-GPU memory of stage 2 for a `describe.ModelDescription` under `strategy` on
    `num_gpus` GPUs with `micro_batch` samples per GPU and `seq_len` backbone tokens."""
    if strategy not in SHARDING:
        raise ValueError(f"no memory model for strategy {strategy!r}; choose one of {sorted(SHARDING)}")
    if num_gpus < 1 or micro_batch < 1:
        raise ValueError(f"num_gpus and micro_batch must be >= 1, got {num_gpus} and {micro_batch}")
    w_shard, g_shard, o_shard, f_shard = (num_gpus if s else 1 for s in SHARDING[strategy])
    targets = targets or desc.dims["targets"]
    frozen = desc["backbone"].total + (desc["clip"].total if targets == "images" else 0)
    trainable = desc.trainable
    act = activation_bytes_per_sample(desc.dims, seq_len)
    return MemoryEstimate(
        strategy, num_gpus, micro_batch,
        weights=BYTES_WEIGHT * trainable / w_shard + BYTES_FROZEN * frozen / f_shard,
        gradients=BYTES_GRAD * trainable / g_shard,
        optimizer=BYTES_OPTIM * trainable / o_shard,
        activations=micro_batch * (act["backbone"] + act["dit"]))


def train_flops_per_sample(desc, seq_len: int = 192, targets: str | None = None) -> dict:
    """Model FLOPs of one training sample: {"backbone", "dit", "clip", "total"}; "clip" is the
    target encoder's forward when targets are encoded every step (`targets="images"`)."""
    d = desc.dims
    T, h, L = seq_len, d["backbone_hidden"], d["backbone_layers"]
    P_layers = d["backbone_layer_params"]  # embeddings are lookups, the LM head is not used
    backbone_fwd = 2 * P_layers * T + 4 * L * T * T * h
    backbone = backbone_fwd + (2 * P_layers * T + 8 * L * T * T * h)  # backward: input gradients only
    N, D, depth, Nq = d["num_tokens"], d["dit_dim"], d["dit_depth"], d["num_query_tokens"]
    dit_fwd = 2 * desc["dit"].total * N + 4 * depth * N * N * D + 4 * depth * N * Nq * D
    dit = 3 * dit_fwd  # forward + backward (inputs and weights)
    out = {"backbone": float(backbone), "dit": float(dit), "clip": 0.0}
    if (targets or d["targets"]) == "images":  # the frozen CLIP tower's forward, every step
        out["clip"] = float(2 * desc["clip"].total * d["clip_tokens"])
    return out | {"total": out["backbone"] + out["dit"] + out["clip"]}
