"""The same training through a hand-written DDP loop, HF Accelerate, Lightning Fabric and
distrain, in the same processes (`distrain bench --only peers`; the peers come with
`pip install -e .[peers]`).

Each arm trains an MLP on synthetic data, interleaved with the others round by round, as
its users write it: the hand-written loop and Fabric divide the loss by the accumulation
steps, Accelerate's `accumulate()` does so itself, distrain weights each micro-batch by its
samples. With lr = 0 the weights stay put, so every arm's last optimizer step (a short
accumulation window: the data set does not divide into whole global batches) can be
compared with the exact mean gradient over the last global batch: the samples of the
epoch that no earlier step saw, each once (an arm that pads the last batch with re-used
samples, or divides a short window's loss by the full accumulation count, misses it).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

ARMS = ("ddp", "accelerate", "fabric", "distrain")


class Indexed(Dataset):
    """Synthetic samples that carry their own index (to know which ones a step saw)."""

    def __init__(self, n: int, features: int = 64, classes: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, features, generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def _model(hidden: list[int]) -> nn.Module:
    from distrain.components.models import mlp

    torch.manual_seed(0)
    return mlp(64, hidden, 10)


def available() -> dict[str, str | None]:
    """The peers' versions (None: not installed)."""
    out: dict[str, str | None] = {}
    for arm, module in (("accelerate", "accelerate"), ("fabric", "lightning_fabric")):
        try:
            out[arm] = __import__(module).__version__
        except ImportError:
            out[arm] = None
    return out


class _Windows:
    """The sample indices of each optimizer step of one epoch, and the last step's gradient."""

    def __init__(self) -> None:
        self.open: list[torch.Tensor] = []
        self.closed: list[list[int]] = []
        self.grad: torch.Tensor | None = None

    def add(self, idx: torch.Tensor) -> None:
        self.open.append(idx)

    def close(self) -> None:
        self.closed.append(torch.cat(self.open).tolist())
        self.open = []

    def record(self, optimizer: torch.optim.Optimizer, *_) -> None:
        """A step pre-hook: the synced gradient the optimizer is about to apply."""
        self.grad = torch.cat([p.grad.flatten().clone() for group in optimizer.param_groups
                               for p in group["params"]])

    def result(self) -> dict:
        out = {"grad": self.grad, "windows": self.closed}
        self.closed = []
        return out


def _epoch_fn(arm: str, args: dict, data: Indexed, seen: list) -> Callable[[], None]:
    """One epoch of `arm`, its last step's gradient and every step's samples appended to
    `seen`."""
    import torch.distributed as dist

    accum, batch, hidden = args["accum"], args["batch"], args["hidden"]
    model = _model(hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    windows = _Windows()
    opt.register_step_pre_hook(windows.record)
    cross_entropy = nn.functional.cross_entropy
    if arm == "distrain":
        from distrain.engine import Engine

        eng = Engine(accum=accum, backend="torchrun")
        model, opt = eng.setup(model, opt)
        loader = eng.loader(data, batch_size=batch, shuffle=False)

        def epoch() -> None:
            for i, (x, y, idx) in enumerate(loader):
                eng.backward(cross_entropy(model(x), y))
                windows.add(idx)
                if (i + 1) % accum == 0 or i + 1 == len(loader):
                    eng.step(opt)
                    windows.close()
            seen.append(windows.result())
        return epoch
    if arm == "accelerate":
        from accelerate import Accelerator

        # cpu=True: without it a GPU-less torchrun quietly trains undistributed.
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        model, opt, loader = acc.prepare(model, opt, DataLoader(data, batch_size=batch))

        def epoch() -> None:
            for x, y, idx in loader:
                with acc.accumulate(model):
                    acc.backward(cross_entropy(model(x), y))
                    windows.add(idx)
                    opt.step()
                    if acc.sync_gradients:
                        windows.close()
                    opt.zero_grad()
            seen.append(windows.result())
        return epoch
    if arm == "fabric":
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator="cpu", strategy="ddp", devices=dist.get_world_size())
        fabric.launch()  # under torchrun: joins the running processes
        model, opt = fabric.setup(model, opt)
        loader = fabric.setup_dataloaders(DataLoader(data, batch_size=batch))
        forward, backward = model, fabric.backward

        def no_sync(skip: bool):
            return fabric.no_backward_sync(model, enabled=skip)
    else:  # the hand-written DDP loop
        from torch.utils.data.distributed import DistributedSampler

        forward = nn.parallel.DistributedDataParallel(model)
        loader = DataLoader(data, batch_size=batch, sampler=DistributedSampler(data, shuffle=False))

        def backward(loss: torch.Tensor) -> None:
            loss.backward()

        def no_sync(skip: bool):
            return forward.no_sync() if skip else contextlib.nullcontext()

    def epoch() -> None:  # the loop DDP's and Fabric's users write: loss / accum
        for i, (x, y, idx) in enumerate(loader):
            step = (i + 1) % accum == 0 or i + 1 == len(loader)
            with no_sync(not step):
                backward(cross_entropy(forward(x), y) / accum)
            windows.add(idx)
            if step:
                opt.step()
                opt.zero_grad()
                windows.close()
        seen.append(windows.result())
    return epoch


def peers(args: dict) -> dict:
    """Under torchrun: every installed arm, interleaved; epoch times, and the last step's
    gradient error against the exact mean over the epoch's last global batch. The arms'
    loops are alike on purpose: each is what its users write."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")  # shared by every arm (each finds it initialized)
    data = Indexed(args["n"])
    versions = available()
    arms = [a for a in ARMS if a in ("ddp", "distrain") or versions[a]]
    seen: dict[str, list] = {a: [] for a in arms}
    epochs = {a: _epoch_fn(a, args, data, seen[a]) for a in arms}
    times: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(args.get("rounds", 3) + 1):
        for arm in arms:
            dist.barrier()
            began = time.perf_counter()
            epochs[arm]()
            dist.barrier()
            if r:
                times[arm].append(time.perf_counter() - began)
    errors = {}
    reference = _model(args["hidden"])
    for arm in arms:
        last = seen[arm][-1]  # the last epoch's
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (last["grad"], last["windows"]))
        grads = [g for g, _ in everyone]
        earlier = {i for _, windows in everyone for w in windows[:-1] for i in w}
        final = [i for _, windows in everyone for i in windows[-1]]
        # The exact last global batch: the epoch's samples no earlier step saw, each once.
        fresh = sorted(set(final) - earlier)
        reference.zero_grad()
        nn.functional.cross_entropy(reference(data.x[fresh]), data.y[fresh]).backward()
        exact = torch.cat([p.grad.flatten() for p in reference.parameters()])
        errors[arm] = {"max_abs": max((g - exact).abs().max().item() for g in grads),
                       "last_batch": len(fresh), "last_step_saw": len(final)}
    steps = (len(data) + args["batch"] * dist.get_world_size() * args["accum"] - 1) // \
        (args["batch"] * dist.get_world_size() * args["accum"])
    return {"arms": arms, "versions": versions, "epoch_s": times, "errors": errors,
            "accum": args["accum"], "steps_per_epoch": steps,
            "world_size": dist.get_world_size()}


def first_step(args: dict) -> dict:
    """One arm alone in fresh processes: the wall-clock time at the end of its first
    optimizer step (the parent subtracts its launch time)."""
    import torch.distributed as dist

    if args["arm"] != "distrain" and not dist.is_initialized():
        dist.init_process_group("gloo")  # what the hand-written loop does itself
    data = Indexed(args["batch"] * int(__import__("os").environ["WORLD_SIZE"]) * args["accum"])
    seen: list = []
    _epoch_fn(args["arm"], args, data, seen)()  # one global batch: one optimizer step
    ready = time.time()
    if args["arm"] != "distrain":  # (the engine leaves the group at exit itself)
        import gc

        gc.collect()  # the DDP wrapper holds the group: gone before the group is
        dist.barrier()
        dist.destroy_process_group()  # a group alive at exit can abort in gloo's threads
    return {"ready_at": ready}
