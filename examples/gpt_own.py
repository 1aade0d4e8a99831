"""examples/gpt_plain.py through distrain.Engine: the same GPT, by iterations, on any number
of processes with the same curve (the loader cuts the same global batches whatever the
layout), the checkpoint a verified one that resumes mid-epoch.

    python examples/gpt_own.py --out runs/gpt-own
    torchrun --nproc-per-node 2 examples/gpt_own.py --batch-size 8 --out runs/gpt-own2
    horovodrun -np 2 -H localhost:2 python examples/gpt_own.py --batch-size 8 --out runs/gpt-hvd

The token file is made on first use: a small synthetic language (each token follows from
the one before it by a fixed random table), 200k uint16 tokens, as nanoGPT's prepare.py
writes train.bin.
"""

import argparse
import json
import math
import os

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

import distrain


def token_file(path: str, n: int = 200_000, vocab: int = 64) -> np.memmap:
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        table = rng.integers(0, vocab, size=(vocab, 2))
        out, token = np.zeros(n, dtype=np.uint16), 1
        for i, noise in enumerate(rng.random(n)):
            token = int(table[token, int(noise < 0.3)])
            out[i] = token
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        out.tofile(path + ".tmp")
        os.replace(path + ".tmp", path)  # whole or absent: a reader never maps half a file
    return np.memmap(path, dtype=np.uint16, mode="r")


class Windows(Dataset):
    """Window i of the token file: tokens[i*stride : i*stride + block] and the next ones."""

    def __init__(self, tokens: np.ndarray, block: int, stride: int) -> None:
        self.tokens, self.block, self.stride = tokens, block, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block - 1) // self.stride

    def __getitem__(self, i: int):
        chunk = torch.from_numpy(self.tokens[i * self.stride:][:self.block + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 64, block: int = 32, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(block, dim)
        self.blocks = nn.Sequential(*[Block(dim, 2) for _ in range(layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2's
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:  # GPT-2's: N(0, 0.02), zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def lr_at(it: int, args) -> float:
    if it < args.warmup:
        return args.lr * (it + 1) / args.warmup
    progress = (it - args.warmup) / max(1, args.max_iters - args.warmup)
    return args.lr * 0.1 + 0.45 * args.lr * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_loss(model, loader, device) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        logits = model(x.to(device))
        y = y.to(device).flatten()
        total += F.cross_entropy(logits.flatten(0, 1), y, reduction="sum").item()
        count += y.numel()
    model.train()
    return total / max(count, 1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/gpt-own")
    p.add_argument("--tokens", default="runs/tokens/train.bin")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--accum", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    eng = distrain.Engine(accum=args.accum, out_dir=args.out)
    device = eng.device
    torch.manual_seed(0)
    with eng.main_process_first():  # rank 0 writes the file, the others then map it
        tokens = token_file(args.tokens)
    split = int(len(tokens) * 0.9)
    train_set, val_set = Windows(tokens[:split], 32, 7), Windows(tokens[split:], 32, 32)
    model = GPT().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    model, optimizer = eng.setup(model, optimizer)
    train_loader = eng.loader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = eng.val_loader(val_set, batch_size=64)
    progress = {"iter": 0, "curve": []}
    eng.register("progress", progress)
    if args.resume:
        eng.load_checkpoint()
    os.makedirs(args.out, exist_ok=True)
    while progress["iter"] < args.max_iters:
        for i, (x, y) in enumerate(train_loader):
            logits = model(x.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())
            eng.backward(loss)
            if eng.step_due:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress["iter"], args)
                eng.step(optimizer, clip_grad_norm=1.0)
                progress["iter"] += 1
                if progress["iter"] % args.eval_every == 0:
                    val = eng.mean(estimate_loss(model, val_loader, device), val_loader)
                    progress["curve"].append([progress["iter"], val])
                    if eng.is_main:
                        print(f"iter {progress['iter']}: val loss {val:.4f}", flush=True)
                    eng.save_checkpoint()
                if progress["iter"] == args.max_iters:
                    break
    with eng.open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(progress["curve"], f)
    eng.close()


if __name__ == "__main__":
    main()
