"""The data module of the toy task (see toy_task.py): JSONL rows ``{"text": ...}``, each row's last token the target."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from nibble.data.batching import pad_batch
from nibble.errors import NibbleError


class LastTokenData:
    """Token ids per row; a batch's ``labels`` [B] are the rows' last tokens, the model sees the rest."""

    def __init__(self, ids: list[list[int]]):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        batch = pad_batch([r[:-1] for r in rows], pad_id)
        batch["labels"] = torch.tensor([r[-1] for r in rows])
        return batch

    def subset(self, indices: Sequence[int]) -> LastTokenData:
        return LastTokenData([self.ids[i] for i in indices])


def read_last_token(path: str | Path, tokenizer, max_seq_len: int) -> LastTokenData:
    """Rows of at least two tokens (one to see, one to predict), cut to ``max_seq_len``."""
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]
    ids = tokenizer.encode_batch(texts, max_length=max_seq_len)
    for number, row in enumerate(ids, 1):
        if len(row) < 2:
            raise NibbleError(f"{path} line {number}: fewer than two tokens; give every row some text")
    return LastTokenData(ids)
