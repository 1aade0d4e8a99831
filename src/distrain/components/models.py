"""Built-in models. A user model is any `package.module:callable` returning an nn.Module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """Logits as cosines between L2-normalised features and class weights (in [-1, 1]); the
    head LDAM was designed for, whose scale `s` then sets the logit range."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32,
              batch_norm: bool = False, cosine_head: bool = False) -> nn.Module:
    """Three 3×3 convolutions, one 2×2 pooling, global average pooling, a linear head.
    Sized for small images such as the 8×8 digits; `batch_norm` adds BatchNorm2d layers,
    `cosine_head` replaces the linear head by CosineLinear (for LDAM)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        CosineLinear(2 * width, num_classes) if cosine_head else nn.Linear(2 * width, num_classes))


def mlp(in_features: int = 64, hidden: list[int] | tuple[int, ...] = (128,),
        num_classes: int = 10) -> nn.Module:
    """Flatten, then Linear+ReLU per entry of `hidden`, then a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4× GELU MLP."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        # Fused (flash) attention where the device has it; (b, heads, t, head_dim) layout.
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: (batch, tokens) ids -> (batch, tokens, vocab_size) logits."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied input and output embeddings, as in GPT-2
        for name, p in self.named_parameters():  # GPT-2's initialisation
            if p.dim() == 2:
                std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("proj.weight", "2.weight")) \
                    else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens exceeds block_size {self.block_size}")
        x = self.drop(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight, plus attention's
        12·layers·width·seq_len (PaLM appendix B); position embeddings do no multiplies."""
        weights = sum(p.numel() for p in self.parameters()) - self.pos.weight.numel()
        layers, width = len(self.blocks), self.tok.weight.shape[1]
        return 6 * weights + 12 * layers * width * seq_len


def gpt(vocab_size: int = 50304, block_size: int = 1024, n_layer: int = 12, n_head: int = 12,
        n_embd: int = 768, dropout: float = 0.0) -> GPT:
    """GPT-2-style language model; the defaults are GPT-2 small (124 M weights, the
    vocabulary padded from 50257 to a multiple of 64). Pair with `data.name=tokens`."""
    return GPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout)


MODELS = {"small_cnn": small_cnn, "mlp": mlp, "gpt": gpt}
