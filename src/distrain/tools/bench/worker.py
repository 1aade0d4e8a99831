"""What runs inside each benchmark process (under torchrun, horovodrun or alone).

    python -m distrain.tools.bench.worker CASE OUT.json '{"json": "args"}'

Every case times its two arms interleaved (A B A B ...) after a warm-up, in the same
processes, and rank 0 writes the raw timings and counts to OUT.json.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from distrain.tools.bench.common import bench_config as _config
from distrain.tools.bench.lm import lm
from distrain.tools.bench.peers import first_step, peers
from distrain.tools.bench.sharding import compile_speed, memory


def _timed(fn, barrier) -> float:
    barrier()
    start = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - start


def overhead(args: dict) -> dict:
    """distrain's training epoch vs a minimal hand-written DDP loop on the same samples."""
    from distrain.components.data.datasets import epoch_plan
    from distrain.components.models import mlp
    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    cfg = _config(args)
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    torch.manual_seed(cfg.run.seed)  # the same initial weights as the Trainer's model
    raw = mlp(64, cfg.model.args["hidden"], 10)
    ref = torch.nn.parallel.DistributedDataParallel(raw) if backend.world_size > 1 else raw
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    data = trainer.train_set

    def reference_epoch(epoch: int) -> None:
        plan = epoch_plan(len(data), epoch, seed=cfg.run.seed, shuffle=True,
                          world_size=backend.world_size, rank=backend.rank,
                          batch_size=cfg.data.batch_size, accum=1)
        for step in plan:
            index = torch.as_tensor(step.micro[0].indices)
            loss = F.cross_entropy(ref(data.inputs[index]), data.targets[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    times: dict[str, list[float]] = {"distrain": [], "reference": []}
    rounds = args.get("rounds", 5)
    for epoch in range(rounds + 1):  # epoch 0 warms both up and is not counted
        a = _timed(lambda: trainer.train_epoch(epoch), backend.barrier)
        b = _timed(lambda: reference_epoch(epoch), backend.barrier)
        if epoch:
            times["distrain"].append(a)
            times["reference"].append(b)
    same = all(torch.equal(p, q) for p, q in
               zip(backend.unwrap(trainer.model).parameters(), raw.parameters()))
    steps = trainer.steps_per_epoch
    out = {"world_size": backend.world_size, "steps_per_epoch": steps,
           "samples_per_epoch": len(data), "weights_bitwise_equal": same,
           "step_s": {k: [t / steps for t in v] for k, v in times.items()}}
    del trainer, ref
    gc.collect()
    backend.teardown()
    return out


def accumulation(args: dict) -> dict:
    """grad_accum_steps=4 with >= 16 MB of gradients: allreduces per optimizer step, and
    the time against syncing every micro-step (plus the compute-only and allreduce-only
    times that predict the difference)."""
    import contextlib
    import copy

    from distrain.components.data.datasets import epoch_plan
    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    accum = args.get("accum", 4)
    width = args.get("width", 2048)  # Linear(width, width): width² floats of gradient
    cfg = _config({**args, "hidden": [width, width]}, f"train.grad_accum_steps={accum}")
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    count = backend.count_gradient_syncs()
    plan = epoch_plan(len(trainer.train_set), 0, seed=0, shuffle=True,
                      world_size=backend.world_size, rank=backend.rank,
                      batch_size=cfg.data.batch_size, accum=accum)
    data = trainer.train_set

    def batches(step):
        for mb in step.micro:
            index = torch.as_tensor(mb.indices)
            yield data.inputs[index], data.targets[index]

    real_no_sync = backend.no_sync
    n = min(args.get("steps", 6), len(plan))

    def run(mode: str) -> None:
        if mode == "every_micro_step":  # the mistake distrain avoids: an allreduce per micro
            backend.no_sync = lambda model: contextlib.nullcontext()
        try:
            for step in plan[:n]:  # the trainer's step, on batches read without a loader
                for j, (mb, batch) in enumerate(zip(step.micro, batches(step))):
                    last = j == len(step.micro) - 1
                    trainer.engine.micro_batch(mb.count, step.size, last)
                    trainer.train_micro_batch(batch, mb.count, last)
        finally:
            backend.no_sync = real_no_sync

    plain = copy.deepcopy(backend.unwrap(trainer.model))  # no DDP/Horovod hooks on its grads

    def compute_only() -> None:
        for step in plan[:n]:
            for x, y in batches(step):
                F.cross_entropy(plain(x), y).backward()
            for p in plain.parameters():
                p.grad = None

    params = list(trainer.model.parameters())
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    flat = torch.zeros(grad_bytes // 4)
    # Horovod's optimizer counts backward passes; syncing every micro-step is a DDP-only arm.
    modes = ["distrain"] + ([] if backend.counts_backward_passes or backend.world_size == 1
                            else ["every_micro_step"])
    times: dict[str, list[float]] = {m: [] for m in (*modes, "compute_only", "allreduce_only")}
    per_step: dict[str, float] = {}
    for r in range(args.get("rounds", 4) + 1):  # round 0 is the warm-up
        for mode in modes:
            before = count()
            t = _timed(lambda: run(mode), backend.barrier)
            per_step[mode] = (count() - before) / n
            if r:
                times[mode].append(t / n)
        t = _timed(compute_only, backend.barrier)
        if r:
            times["compute_only"].append(t / n)
        t = _timed(lambda: backend.all_reduce(flat), backend.barrier)
        if r:
            times["allreduce_only"].append(t)
    # One "set" is what one synced backward reduces: every DDP bucket, or every Horovod tensor.
    per_sync = (per_step["every_micro_step"] / accum if "every_micro_step" in per_step
                else len(params))
    out = {"world_size": backend.world_size, "backend": backend.name, "accum": accum,
           "grad_bytes": grad_bytes, "allreduces_per_set": per_sync,
           "allreduce_calls_per_step": per_step,
           "allreduce_sets_per_step": {k: v / per_sync for k, v in per_step.items()},
           "step_s": times}
    del trainer
    gc.collect()
    backend.teardown()
    return out


def sync(args: dict) -> dict:
    """distrain's gradient sync (DDP's bucketed allreduce, or Horovod's optimizer hooks and
    synchronize()) vs one raw allreduce of a flat tensor of the same bytes, for each size.
    The sync's time is backward with it minus backward without it (the same model, no hooks),
    so the arms compare communication, not the gradient's computation. Both arms keep their
    gradient buffers (zeroed in place): a freshly allocated 64 MB gradient costs page faults
    that vary by tens of ms a step on a shared machine and would drown the difference."""
    import copy

    from distrain.config import load_config
    from distrain.distributed import make_backend

    cfg = load_config(None, [f"run.out_dir={args['out_dir']}"])
    backend = make_backend(cfg)
    backend.setup()
    results = {}
    for mb in args.get("sizes_mb", [1, 4, 16, 64]):
        n = int(mb * (1 << 20)) // 4
        model = _Flat(n)
        plain = copy.deepcopy(model)
        one = torch.ones(())
        wrapped = backend.wrap_model(model)
        optimizer = backend.wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.0), wrapped, 1)

        def with_sync() -> None:
            wrapped(one).backward()
            backend.synchronize(optimizer)  # Horovod: wait for the allreduce (DDP waited already)
            model.w.grad.zero_()

        def without_sync() -> None:
            plain(one).backward()
            plain.w.grad.zero_()

        flat = torch.ones(n)

        def raw() -> None:
            # A fixed name, as the optimizer's hooks have: Horovod's response cache then skips
            # the negotiation on repeats (the other backends ignore it).
            backend.all_reduce(flat, name=f"bench.raw.{mb}")

        times: dict[str, list[float]] = {"distrain": [], "raw_allreduce": [], "compute": []}
        for r in range(args.get("rounds", 7) + 1):
            a = _timed(with_sync, backend.barrier)
            c = _timed(without_sync, backend.barrier)
            b = _timed(raw, backend.barrier)
            if r:
                times["distrain"].append(max(a - c, 1e-9))
                times["raw_allreduce"].append(b)
                times["compute"].append(c)
        results[str(mb)] = times
        del wrapped, optimizer, model, plain
        gc.collect()
    out = {"world_size": backend.world_size, "backend": backend.name,
           "controller": backend.describe().get("controller"), "by_size_mb": results}
    backend.teardown()
    return out


class _Flat(torch.nn.Module):
    """One parameter of n floats. The gradient of a sum is an expanded scalar: backward adds
    it into the kept gradient buffer in place, without allocating n floats."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(n))

    def forward(self, one: torch.Tensor) -> torch.Tensor:
        return self.w.sum() * one


def memcpy(args: dict) -> dict:
    """The physical ceiling on one machine: copying the same bytes in one process."""
    results = {}
    for mb in args.get("sizes_mb", [1, 4, 16, 64]):
        n = int(mb * (1 << 20)) // 4
        src, dst = torch.ones(n), torch.empty(n)
        times = []
        for r in range(args.get("rounds", 7) + 1):
            start = time.perf_counter()
            dst.copy_(src)
            if r:
                times.append(time.perf_counter() - start)
        results[str(mb)] = times
    return {"by_size_mb": results}


def checkpoint(args: dict) -> dict:
    """distrain's save (atomic, hashed, marker) and its async variant vs torch.save + fsync."""
    from distrain.components.checkpoint import files as ckpt

    folder = Path(args["out_dir"]) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    n = int(args.get("mb", 256) * (1 << 20)) // 4
    state = {ckpt.MODEL: {"w": torch.randn(n)}, ckpt.GLOBAL_STEP: 0}
    saver = ckpt.AsyncSaver()

    def bare() -> None:
        with open(folder / "bare.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    def distrain_save() -> None:
        state[ckpt.GLOBAL_STEP] += 1
        ckpt.save(state, folder, True, False, 2)

    def distrain_async() -> None:  # the time the loop is blocked
        state[ckpt.GLOBAL_STEP] += 1
        saver.submit(state, folder, True, False, 2)

    times: dict[str, list[float]] = {"bare_torch_save": [], "distrain": [], "distrain_async": []}
    for r in range(args.get("rounds", 3) + 1):
        for name, fn in (("bare_torch_save", bare), ("distrain", distrain_save),
                         ("distrain_async", distrain_async)):
            start = time.perf_counter()
            fn()
            took = time.perf_counter() - start
            saver.wait()  # the background write finishes outside the measured time
            if r:
                times[name].append(took)
    newest = ckpt.step_files(folder)[0]
    return {"bytes": newest.stat().st_size, "verified": ckpt.verify(newest) is None,
            "step_s": times}


def startup(args: dict) -> dict:
    """Time from launch to the end of distrain's first step, or to a bare process group."""
    now = time.time()
    if args.get("arm") == "bare":
        if os.environ.get("HOROVOD_RANK") is not None:
            import horovod.torch as hvd

            hvd.init()
            rank = hvd.rank()
            hvd.shutdown()
        else:
            import torch.distributed as dist

            dist.init_process_group("gloo")
            rank = dist.get_rank()
            dist.barrier()
            dist.destroy_process_group()
        return {"ready_at": time.time(), "rank": rank, "began": now}
    from distrain.config import load_config
    from distrain.trainer.run import train

    cfg = load_config(None, [f"run.out_dir={args['out_dir']}", "checkpoint.resume=none",
                             "logging.plot=false", "model.name=mlp", "train.epochs=1",
                             "model.args={in_features: 64, hidden: [32], num_classes: 10}",
                             "train.log_every_steps=1000", "checkpoint.save_last=false"])
    summary = train(cfg)
    return {"ready_at": summary["first_step_at"], "rank": 0, "began": now}


def writes(args: dict) -> dict:
    """A short training run with step checkpoints: the checkpoint bytes each rank wrote."""
    from distrain.components.checkpoint import files as ckpt
    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    cfg = _config({**args, "hidden": [64], "n": 1024}, "checkpoint.every_steps=4",
                  "checkpoint.save_last=true", "train.epochs=1")
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    trainer.fit()
    by_rank = backend.all_gather_object(ckpt.bytes_written)
    del trainer
    gc.collect()
    backend.teardown()
    return {"by_rank": by_rank}


CASES = {"writes": writes, "overhead": overhead, "accumulation": accumulation, "sync": sync,
         "memcpy": memcpy, "checkpoint": checkpoint, "startup": startup, "lm": lm,
         "memory": memory, "compile": compile_speed, "peers": peers,
         "first_step": first_step}


def main() -> int:
    case, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = CASES[case](args)
    from distrain.distributed.environment import launcher_rank

    if launcher_rank() == 0 and result is not None:
        Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
