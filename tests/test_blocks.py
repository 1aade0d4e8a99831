"""model.blocks (the units of FSDP and activation checkpointing) and
train.activation_checkpointing: the same numbers, activations recomputed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrain.components.blocks import find_blocks
from distrain.components.models import gpt
from distrain.errors import ConfigError


class Block(nn.Module):
    calls = 0  # forward passes run, recomputations included

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(16, 16), nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Block.calls += 1
        return x + self.drop(torch.nn.functional.gelu(self.fc(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def my_blocks(model: nn.Module) -> list[nn.Module]:
    return [model.stem, model.head]


def test_blocks_default_spec_and_user_function():
    net = Net()
    assert find_blocks(net) == list(net.layers)  # the children of a ModuleList
    assert find_blocks(net, ["Block"]) == list(net.layers)
    assert find_blocks(net, ["Linear"]) == [net.stem, *(b.fc for b in net.layers), net.head]
    assert find_blocks(net, [f"{__name__}:my_blocks"]) == [net.stem, net.head]
    model = gpt(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16)
    assert find_blocks(model) == list(model.blocks)
    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert find_blocks(mlp) == [mlp[0], mlp[2]]  # no list: the children that hold weights
    with pytest.raises(ConfigError, match="model.blocks: no module of class Blok in the model; did you mean 'Block'"):
        find_blocks(net, ["Blok"])
    with pytest.raises(ConfigError, match="model.blocks: .* returned Tensor"):
        find_blocks(net, lambda m: [torch.zeros(1)])


def train_steps(checkpointing: bool) -> tuple[torch.Tensor, int]:
    from distrain import DDP, Engine

    eng = Engine(backend="local", strategy=DDP(activation_checkpointing=checkpointing), seed=0)
    torch.manual_seed(0)
    model = Net()
    model, opt = eng.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    Block.calls = 0
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        eng.micro_batch(count=16, size=16, last=True)
        eng.backward(nn.functional.cross_entropy(model(x), y))
        eng.step(opt)
    state = torch.cat([p.detach().flatten() for p in model.parameters()])
    keys = list(model.state_dict())
    eng.close()
    return state, Block.calls, keys


def test_activation_checkpointing_recomputes_with_the_same_numbers(no_dist_env):
    plain, calls, keys = train_steps(False)
    recomputed, calls_ac, keys_ac = train_steps(True)
    assert calls == 3 * 3 and calls_ac == 2 * 3 * 3  # each block's forward ran again in backward
    assert torch.equal(plain, recomputed)  # dropout's random stream replayed exactly
    assert keys == keys_ac  # no wrapper module: checkpoints load either way
