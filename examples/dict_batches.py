"""Dict batches, a model with keyword inputs that returns a dict, and a step function:
the shape of a Hugging Face-style training set-up, through the YAML trainer.

    PYTHONPATH=examples distrain train --config configs/dict_batches.yaml
    PYTHONPATH=examples torchrun --nproc-per-node 2 -m distrain train --config configs/dict_batches.yaml

The data set yields `{"input_ids", "attention_mask", "labels"}` (the digits as sequences of
pixel tokens, each with a random amount of padding) and has no `targets` attribute; the
model returns `{"loss", "logits"}`; `train.step: dict_batches:step` computes the loss of one
micro-batch and a named metric (`acc`), which distrain reduces exactly like the loss and
reports as `train_acc` / `val_acc`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset

LEVELS = 17  # pixel values 0..16 are the tokens; PAD is one more
PAD = LEVELS


class PixelTokens(Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = images.clone()
        self.mask = torch.ones_like(images)
        pad = torch.randint(0, 16, (len(images),), generator=g)  # up to 15 padded tokens
        for i, p in enumerate(pad.tolist()):
            if p:
                self.ids[i, -p:], self.mask[i, -p:] = PAD, 0
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i],
                "labels": self.labels[i]}


def data(val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.long), torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    return PixelTokens(x[train], y[train], seed), PixelTokens(x[val], y[val], seed + 1)


class TokenClassifier(nn.Module):
    """Token + position embeddings, padding masked out, a linear head; returns a dict."""

    def __init__(self, dim: int = 16, num_classes: int = 10, length: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(LEVELS + 1, dim)
        self.positions = nn.Parameter(torch.zeros(length, dim))
        self.head = nn.Sequential(nn.LayerNorm(length * dim), nn.Linear(length * dim, num_classes))

    def forward(self, input_ids, attention_mask, labels=None) -> dict[str, torch.Tensor]:
        h = (self.tokens(input_ids) + self.positions) * attention_mask.unsqueeze(-1)
        logits = self.head(h.flatten(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.float(), labels)
        return out


def model(dim: int = 16, num_classes: int = 10) -> nn.Module:
    return TokenClassifier(dim, num_classes)


def step(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch: its mean loss, and named per-batch means to report."""
    out = model(**batch)
    acc = (out["logits"].argmax(-1) == batch["labels"]).float().mean()
    return out["loss"], {"acc": acc}
