"""Benchmark workers for the memory strategies: FSDP vs DDP bytes and step time, and
torch.compile vs eager. Run by `distrain bench --only fsdp compile` (see bench/__init__.py)."""

from __future__ import annotations

import gc
import resource
import time

import torch


def _local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (a DTensor: its shard only)."""
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def memory(args: dict) -> dict:
    """One run of the config trainer under dist.strategy=args['strategy'] with AdamW: this
    rank's bytes of weights, gradients (counted as the optimizer steps on them) and optimizer
    state, the median epoch time and the process's peak RSS."""
    from distrain.distributed import make_backend
    from distrain.tools.bench.common import bench_config as _config
    from distrain.trainer.loop import Trainer

    cfg = _config(args, f"dist.strategy={args['strategy']}", "optimizer.name=adamw",
                  "optimizer.lr=0.001",
                  f"train.activation_checkpointing={str(args.get('checkpointing', False)).lower()}")
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    params = list(trainer.model.parameters())
    grads: list[int] = []
    trainer.optimizer.register_step_pre_hook(
        lambda opt, a, k: grads.append(_local_bytes(p.grad for p in params if p.grad is not None)))
    epochs = []
    for epoch in range(args.get("rounds", 3) + 1):
        backend.barrier()
        began = time.perf_counter()
        trainer.train_epoch(epoch)
        backend.barrier()
        if epoch:  # the first epoch warms up
            epochs.append(time.perf_counter() - began)
    state = [t for s in trainer.optimizer.state.values() for t in s.values()
             if isinstance(t, torch.Tensor)]
    mine = {"params": _local_bytes(params), "grads": max(grads), "optimizer": _local_bytes(state),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    ranks = backend.all_gather_object(mine)
    out = {"strategy": args["strategy"], "by_rank": ranks, "epoch_s": epochs,
           "weights": sum(p.numel() for p in params),  # a DTensor's numel is the whole one
           "steps_per_epoch": trainer.steps_per_epoch}
    del trainer, params
    gc.collect()
    backend.teardown()
    return out


def compile_speed(args: dict) -> dict:
    """A small GPT through distrain.Engine, eager and compiled, in one process: the time to
    the first step (the compile), the median step after it and the final weights' largest
    difference."""
    from distrain.components.models import gpt
    from distrain.distributed.strategy import DDP
    from distrain.engine import Engine

    shape = {"vocab_size": 256, "block_size": args.get("seq_len", 64), "n_layer": 2,
             "n_head": 4, "n_embd": args.get("n_embd", 128), "dropout": 0.0}
    batch, steps = args.get("batch", 16), args.get("steps", 20)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (steps, batch, shape["block_size"] + 1), generator=g)
    out: dict = {"first_step_s": {}, "step_s": {}, "weights": {}}
    for arm in ("eager", "compiled"):
        eng = Engine(backend="local", strategy=DDP(compile=arm == "compiled"), seed=0)
        torch.manual_seed(0)
        model = gpt(**shape)
        model, opt = eng.setup(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        times = []
        for tokens in data:
            began = time.perf_counter()
            eng.micro_batch(count=batch, size=batch, last=True)
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            eng.backward(loss)
            eng.step(opt)
            times.append(time.perf_counter() - began)
        out["first_step_s"][arm] = times[0]
        out["step_s"][arm] = times[2:]
        out["weights"][arm] = torch.cat([p.detach().flatten() for p in model.parameters()])
        eng.close()
    diff = (out["weights"]["eager"] - out["weights"]["compiled"]).abs().max().item()
    out["weights"] = sum(p.numel() for p in model.parameters())
    out["weights_max_abs_diff"] = diff
    return out
