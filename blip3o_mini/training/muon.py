"""Muon for a network's hidden matrices and AdamW for the rest, as one optimizer.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training") replaces the
momentum of each hidden 2-D weight by the nearest semi-orthogonal matrix (five Newton-Schulz
iterations) before stepping: every direction of the update moves at the same rate, where
AdamW's update is dominated by a few. Moonshot's scaling, 0.2 * sqrt(max(fan_out, fan_in)),
gives the update AdamW's RMS, so AdamW's learning rate, weight decay and schedule carry over.
Vectors, embeddings and output layers stay with AdamW, as the method prescribes.

One optimizer rather than two so that Lightning's automatic optimisation, the lr scheduler
and checkpoints work unchanged: each parameter group's `muon` flag says which rule it follows.
The tests check both rules against `torch.optim.Muon` and `torch.optim.AdamW`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as adamw_functional

from .schedule import adamw, fusable

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon


def ns_dtype(device: torch.device) -> torch.dtype:
    """Newton-Schulz's dtype: bf16 (as torch.optim.Muon; the iteration is insensitive to
    rounding) on GPUs and on CPUs with bf16 instructions; fp32 on other CPUs, which emulate every
    bf16 product: on a 2-core AVX2 CPU a Muon step over the toy CLIP's matrices took 1.27 s in
    bf16 (0.3 GFLOP/s) and 43 ms in fp32."""
    from .distributed import cpu_has_bf16

    return torch.bfloat16 if device.type != "cpu" or cpu_has_bf16() else torch.float32


def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> Tensor:
    """About the nearest semi-orthogonal matrix to each matrix of `g` ((A, B) or a stack (k, A,
    B)): singular values pushed into roughly [0.7, 1.2], computed in `dtype` (default
    `ns_dtype`). A stack runs as batched matmuls: one call for all the blocks' matrices of one
    shape, three times faster on the toy DiT than a loop over them."""
    a, b, c = NS_COEFFICIENTS
    dtype = dtype or ns_dtype(g.device)
    x = g.to(dtype) if g.ndim == 3 else g.to(dtype)[None]  # (k, A, B)
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide side: (min, max) @ (max, min) grams are the cheap ones
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # Frobenius >= spectral: singular values <= 1
    for _ in range(steps):
        gram = x @ x.mT  # (k, m, m)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    x = x.mT if tall else x
    return x if g.ndim == 3 else x[0]


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `muon=True` (2-D weights only) follow Muon with Nesterov momentum; the others
    follow AdamW. `lr` and `weight_decay` are shared, so one schedule drives both. `fused`: the
    AdamW groups step in torch's fused kernel (one pass over all tensors, as `schedule.adamw`),
    which pays for large tables such as CLIP's 49,408-token embedding; not for recipes that clip
    gradients under mixed precision (Lightning refuses to clip for a fused optimizer)."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, betas: tuple = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.95, fused: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum, muon=False,
                        fused=fused)
        super().__init__(params, defaults)
        for group in self.param_groups:
            bad = [tuple(p.shape) for p in group["params"] if group["muon"] and p.ndim != 2]
            if bad:
                raise ValueError(f"Muon steps 2-D weights only, got shapes {bad}; "
                                 "put vectors and other tensors in a group with muon=False (AdamW)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                _muon_step(params, self.state, group)
            elif group["fused"]:
                _fused_adamw_step(params, self.state, group)
            else:
                for p in params:
                    _adamw_step(p, self.state[p], group)
        return loss


def _muon_step(params: list[Tensor], state: dict, group: dict) -> None:
    lr, mu = group["lr"], group["momentum"]
    by_shape: dict[torch.Size, list[Tensor]] = {}
    for p in params:
        by_shape.setdefault(p.shape, []).append(p)
    for shape, same in by_shape.items():
        updates = []
        for p in same:
            buf = state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)
            updates.append(p.grad.lerp(buf, mu))  # Nesterov: look one momentum step ahead
        ortho = newton_schulz(torch.stack(updates))  # (k, A, B): one batched call per shape
        for p, u in zip(same, ortho):
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(shape)))  # AdamW's update RMS (Moonshot)


def _adamw_step(p: Tensor, state: dict, group: dict) -> None:
    lr, (b1, b2) = group["lr"], group["betas"]
    if not state:
        state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
    state["step"] += 1
    t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * group["weight_decay"])
    m.lerp_(p.grad, 1 - b1)
    v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
    denom = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"])
    p.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))


def _fused_adamw_step(params: list[Tensor], state: dict, group: dict) -> None:
    """`_adamw_step` for a whole group at once, in torch's fused AdamW kernel."""
    for p in params:
        if not state[p]:  # the fused kernel takes each step count as a tensor beside its weight
            state[p].update(step=torch.zeros((), device=p.device), exp_avg=torch.zeros_like(p),
                            exp_avg_sq=torch.zeros_like(p))
    (b1, b2), st = group["betas"], [state[p] for p in params]
    adamw_functional(params, [p.grad for p in params], [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st],
                     [], [s["step"] for s in st], fused=True, amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def hidden_matrices(blocks: nn.Module) -> list[Tensor]:
    """The 2-D weights of the Linear layers inside `blocks` (a transformer's stack): Muon's
    share. Input and output projections, embeddings, norms and gates stay with AdamW."""
    return [m.weight for m in blocks.modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]


def with_muon_group(groups: list[dict], matrices: list[Tensor], **options) -> list[dict]:
    """AdamW parameter `groups` with `matrices` moved out of them into one Muon group (with
    `options`, e.g. its weight_decay)."""
    taken = {id(p) for p in matrices}
    kept = [g | {"params": [p for p in g["params"] if id(p) not in taken]} for g in groups]
    return [g for g in kept if g["params"]] + [{"params": matrices, "muon": True, **options}]


def check_optimizer(name: str, setting: str) -> None:
    """A one-line error for an optimizer other than adamw or muon."""
    if name not in ("adamw", "muon"):
        raise ValueError(f"{setting} must be adamw or muon, got {name!r}")


def check_unsharded(trainer, setting: str) -> None:
    """Muon orthogonalises whole matrices: a one-line error for a Lightning strategy that hands
    the optimizer shards of them (DeepSpeed ZeRO, FSDP). `trainer`: None outside a Trainer."""
    name = type(getattr(trainer, "strategy", None)).__name__
    if "DeepSpeed" in name or "FSDP" in name:
        raise ValueError(f"{setting}: muon needs every weight matrix whole on each rank, but {name} "
                         "shards them; use trainer.strategy ddp, or optimizer adamw")


def make_optimizer(name: str, groups: list[dict], matrices: list[Tensor], setting: str, trainer=None,
                   muon_options: dict | None = None, fused: bool = False, **kwargs) -> torch.optim.Optimizer:
    """A recipe's optimizer: `torch.optim.AdamW` over `groups`, or for `name` muon a `MuonAdamW`
    with `matrices` moved into a Muon group (with `muon_options`). `fused`: AdamW's part in
    torch's fused kernel where every parameter allows it (`schedule.adamw`; recipes that do not
    clip gradients). `kwargs` (lr, betas, weight decay) go to either; `setting` names the config
    key in errors."""
    check_optimizer(name, setting)
    if name == "adamw":
        return adamw(groups, **kwargs) if fused else torch.optim.AdamW(groups, **kwargs)
    check_unsharded(trainer, setting)
    groups = with_muon_group(groups, matrices, **(muon_options or {}))
    rest = [p for g in groups if not g.get("muon") for p in g["params"]]
    return MuonAdamW(groups, fused=fused and fusable(rest), **kwargs)
