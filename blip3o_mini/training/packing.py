"""Shared-prefix packing: all question-answer turns of one image in one training row.

LLaVA trains on single- and multi-turn conversations. Here every turn is trained exactly as it
is asked at evaluation time (image, one question, the answer), but the 64 image tokens, the
bulk of every sequence, are computed once per image: a row is

    [prefix: <|user|> + 64 image tokens] [turn 1] [turn 2] ... [turn k]

and a 4D attention mask lets each turn see the prefix and itself only, with position ids that
restart after the prefix for every turn. Turn j of a packed row then produces exactly the
states of the one-turn sequence `prefix + turn j` (tests/test_understanding.py checks it), at
about a third of the cost of one row per question. The loss counts answer tokens only.

The pieces of the chat template (what comes before the question, between question and answer,
after the answer) are read off the tokenizer's own template, so the packing follows any format.

Shape glossary: B batch, T row length (tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenizer import chat_format_of, expand_image_placeholders, user_turn

IGNORE = -100  # label of every token that is not part of an answer
PAD_SEGMENT = -1


@dataclass(frozen=True)
class ChatPieces:
    before: str  # e.g. "<|user|><|image|>"        (the shared prefix, image placeholder in it)
    between: str  # e.g. "<|end|><|assistant|>"    (question -> answer)
    after: str  # e.g. "<|end|>"                    (end of the answer turn)


def chat_pieces(tokenizer) -> ChatPieces:
    q, a = "\x01QUESTION\x01", "\x01ANSWER\x01"
    text = tokenizer.apply_chat_template(user_turn(q) + [{"role": "assistant", "content": a}], tokenize=False)
    before, rest = text.split(q)
    between, after = rest.split(a)
    return ChatPieces(before, between, after)


@dataclass
class PackedRow:
    input_ids: list[int]
    labels: list[int]  # IGNORE except on answer tokens (answer + end of turn)
    positions: list[int]  # restart after the prefix for every turn
    segments: list[int]  # 0 prefix, j for turn j


class Packer:
    """Turns (question, answer) lists into `PackedRow`s for one tokenizer and image size."""

    def __init__(self, tokenizer, num_image_tokens: int):
        self.tokenizer = tokenizer
        self.pieces = chat_pieces(tokenizer)
        prefix = expand_image_placeholders(self.pieces.before, chat_format_of(tokenizer).image, num_image_tokens)
        self.prefix_ids = self._ids([prefix])[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def pack_many(self, conversations: list[list[tuple[str, str]]]) -> list[PackedRow]:
        """One row per conversation (all its turns share the image prefix); batched tokenisation."""
        flat = [qa for conv in conversations for qa in conv]
        q_ids = self._ids([q + self.pieces.between for q, _ in flat])
        a_ids = self._ids([a + self.pieces.after for _, a in flat])
        rows, k = [], 0
        for conv in conversations:
            P = len(self.prefix_ids)
            ids, labels = list(self.prefix_ids), [IGNORE] * P
            positions, segments = list(range(P)), [0] * P
            for j in range(1, len(conv) + 1):
                q, a = q_ids[k], a_ids[k]
                k += 1
                ids += q + a
                labels += [IGNORE] * len(q) + a
                positions += list(range(P, P + len(q) + len(a)))
                segments += [j] * (len(q) + len(a))
            rows.append(PackedRow(ids, labels, positions, segments))
        return rows


def packed_attention_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> boolean mask (B, 1, T, T), True where a query may attend: causal,
    a turn sees the prefix (0) and itself; padding (-1) is seen by nobody and sees only itself
    (no empty softmax rows). transformers passes a 4D mask to SDPA as is."""
    B, T = segments.shape
    q, k = segments[:, :, None], segments[:, None, :]  # (B, T, 1), (B, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    allowed = causal & ((k == 0) | (k == q)) & (k != PAD_SEGMENT)  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool, device=segments.device)
    return allowed[:, None]  # (B, 1, T, T)


def collate_rows(rows: list[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids, labels, position_ids, segments (B, T)."""
    T = max(len(r.input_ids) for r in rows)

    def pad(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (T - len(values))

    return {
        "input_ids": torch.tensor([pad(r.input_ids, pad_id) for r in rows]),
        "labels": torch.tensor([pad(r.labels, IGNORE) for r in rows]),
        "position_ids": torch.tensor([pad(r.positions, 0) for r in rows]),
        "segments": torch.tensor([pad(r.segments, PAD_SEGMENT) for r in rows]),
    }
