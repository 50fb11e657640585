"""A frozen stand-in with the QueryBackbone interface, for the stage-2 tests and
tests/ddp_script.py: words (hashed into 64 ids) and queries through one transformer layer."""

from __future__ import annotations

import torch
from torch import nn


class TinyBackbone(nn.Module):
    def __init__(self, hidden_size: int = 32, ffn: int = 64, dropout: float = 0.1):
        super().__init__()
        self.hidden_size = hidden_size
        self.embed = nn.Embedding(64, hidden_size)
        self.layer = nn.TransformerEncoderLayer(hidden_size, 2, ffn, dropout=dropout, batch_first=True)

    def query_states(self, prompts: list[str], query_embeds: torch.Tensor) -> torch.Tensor:
        """The last-layer states at the query positions: (B, Nq, hidden_size)."""
        ids = [torch.tensor([sum(map(ord, w)) % 64 for w in p.split()]) for p in prompts]
        T = max(len(i) for i in ids)
        tok = torch.stack([nn.functional.pad(i, (0, T - len(i))) for i in ids])  # (B, T)
        B, Nq = len(prompts), query_embeds.shape[-2]
        x = torch.cat([self.embed(tok), query_embeds.expand(B, Nq, -1)], dim=1)  # (B, T+Nq, K)
        return self.layer(x)[:, T:]  # (B, Nq, K)
