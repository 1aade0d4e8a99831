"""A plain single-process PyTorch training loop (plain_loop.py), and the same loop through
distrain's API (own_loop.py), which runs unchanged on any number of processes:

    python examples/plain_loop.py --out runs/plain --precision fp16 --accum 2
    python examples/own_loop.py --out runs/own --precision fp16 --accum 2
    torchrun --nproc-per-node 2 examples/own_loop.py --out runs/own2 --batch-size 16
    horovodrun -np 2 python examples/own_loop.py --out runs/own3 --batch-size 16  # or mpirun

Long-tailed digits, an LDAM loss written as an nn.Module, Mixup, fp16 autocast with a
GradScaler, gradient accumulation, clipping, ReduceLROnPlateau on the validation loss,
early stopping, the best weights saved, one JSON line of metrics per epoch.
`diff examples/plain_loop.py examples/own_loop.py` shows every change (at most 12 lines,
tests/test_engine.py keeps it so). In own_loop.py the global batch is processes ×
--batch-size × --accum: with --mixup 0 in fp32, 1 × 32, 2 × 16 and 2 × 8 × accumulation 2
give the same weights.
"""

import argparse
import json
import os

import numpy as np
import distrain
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset


def long_tailed_digits(imbalance=10.0, seed=0):
    """scikit-learn's 8x8 digits; class c keeps 1/imbalance^(c/9) of its training images."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = order[:360], order[360:]
    keep = []
    for c in range(10):
        members = train[y[train] == c]
        keep.append(members[:max(1, int(len(members) * imbalance ** (-c / 9)))])
    train = torch.cat(keep)
    counts = torch.bincount(y[train], minlength=10).tolist()
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), counts


class LDAMLoss(nn.Module):
    """Label-distribution-aware margin loss (Cao et al., 2019)."""

    def __init__(self, cls_num_list, max_m=0.5, s=30.0):
        super().__init__()
        m_list = 1.0 / np.sqrt(np.sqrt(np.asarray(cls_num_list, dtype=np.float64)))
        self.register_buffer("m_list", torch.tensor(m_list * (max_m / m_list.max()),
                                                    dtype=torch.float32))
        self.s = s

    def forward(self, x, target):
        x = x.float()  # fp16 logits and float32 margins do not mix
        batch_m = self.m_list[target].unsqueeze(1)
        x_m = x.scatter_add(1, target.unsqueeze(1), -batch_m)
        return F.cross_entropy(self.s * x_m, target)


class NormedLinear(nn.Module):
    """The cosine classifier LDAM is trained with: logits in [-1, 1], scaled by the loss's s."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features).uniform_(-1, 1))

    def forward(self, x):
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


def mixup(x, y, alpha):
    if alpha <= 0:
        return x, y, y, 1.0
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(y)).to(x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


@torch.no_grad()
def evaluate(model, loader, criterion, device):
    model.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        total += criterion(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    model.train()
    return total / n, correct / n


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/own_loop")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--mixup", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--patience", type=int, default=4)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    eng = distrain.Engine(precision=args.precision, accum=args.accum, out_dir=args.out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_set, val_set, counts = long_tailed_digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), NormedLinear(128, 10)).to(device)
    criterion = LDAMLoss(counts).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
    model, optimizer = eng.setup(model, optimizer)
    train_loader = eng.loader(train_set, batch_size=args.batch_size, shuffle=True)
    val_loader = eng.val_loader(val_set, batch_size=256)

    rows, best, bad = [], float("inf"), 0
    for epoch in range(args.epochs):
        model.train()
        for i, (x, y) in enumerate(train_loader):
            x, y = x.to(device), y.to(device)
            x, y_a, y_b, lam = mixup(x, y, args.mixup)
            with eng.autocast():  # fp16 under --precision fp16, as Engine(precision=) says
                out = model(x)
                loss = lam * criterion(out, y_a) + (1 - lam) * criterion(out, y_b)
            eng.backward(loss)
            if (i + 1) % args.accum == 0 or i + 1 == len(train_loader):
                eng.step(optimizer, clip_grad_norm=5.0)
        val_loss, val_acc = eng.mean(evaluate(model, val_loader, criterion, device), val_loader)
        scheduler.step(val_loss)
        rows.append({"epoch": epoch + 1, "val_loss": val_loss, "val_acc": val_acc,
                     "lr": optimizer.param_groups[0]["lr"]})
        eng.on_main(write_rows, os.path.join(args.out, "metrics.jsonl"), rows)
        if val_loss < best:
            best, bad = val_loss, 0
            eng.save(eng.model_state_dict(), os.path.join(args.out, "best.pt"))
        else:
            bad += 1
            if bad >= args.patience:
                break
    eng.save(eng.model_state_dict(), os.path.join(args.out, "final.pt"))
    print(f"best val_loss {best:.4f}; last epoch {rows[-1]}")


if __name__ == "__main__":
    main()
