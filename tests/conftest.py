"""Shared helpers: real gloo process groups on CPU, started the way torchrun would."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # spawned children import test modules by name


# `./launcher/test -m quick` (about 4 minutes): the checks to run before every commit; the
# whole suite before a merge. A file is quick when its tests take seconds, not minutes.
QUICK = {"test_layers.py", "test_config.py", "test_schema.py", "test_checkpoint.py",
         "test_data.py", "test_samplers.py", "test_metrics.py", "test_scheduling.py",
         "test_blocks.py", "test_user_pieces.py", "test_plugins.py", "test_backends.py",
         "test_precision.py", "test_world_sizes.py"}


def pytest_configure(config) -> None:
    """The suite's caches (the digits split) in a folder of its own, not the user's home:
    every process a test starts inherits it. The Horovod wheel cache of ./launcher/setup,
    run before pytest, is not affected."""
    import tempfile

    if "DISTRAIN_TEST_CACHE" not in os.environ:  # once, not again in each child pytest
        os.environ["DISTRAIN_TEST_CACHE"] = config._distrain_cache = \
            tempfile.mkdtemp(prefix="distrain-test-cache-")
    os.environ["XDG_CACHE_HOME"] = os.environ["DISTRAIN_TEST_CACHE"]


def pytest_unconfigure(config) -> None:
    import shutil

    if hasattr(config, "_distrain_cache"):
        shutil.rmtree(config._distrain_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.path.name in QUICK:
            item.add_marker(pytest.mark.quick)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn, args, queue, environ) -> None:
    os.environ.clear()  # the caller's environment now, not the fork server's at its start
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    torch.set_num_threads(1)
    try:
        # Plain pickle copies tensors into bytes (the queue would share memory that dies with us).
        queue.put((rank, "ok", pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
        raise


# The processes of run_distributed fork from one server that imported torch once (a fresh
# interpreter per process spends ~4 s importing torch and its compiler stack); nothing in
# it has started a thread or a process group, so each child starts as a clean process.
mp.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "distrain.engine"])


def run_distributed(fn, world_size: int, *args, timeout: float = 240) -> list:
    """Run `fn(*args)` on `world_size` new processes with torchrun's environment set
    (so `backend: auto` picks the torchrun backend over gloo); return results by rank."""
    ctx = mp.get_context("forkserver")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, fn, args, queue,
                                              dict(os.environ)))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]


@pytest.fixture
def no_dist_env(monkeypatch):
    """A plain single process even if the test runner itself was started by torchrun."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)


def tiny_config(out_dir, *overrides: str):
    """A small, fast digits job (an MLP without dropout or BatchNorm)."""
    from distrain.config import load_config

    return load_config(None, [f"run.out_dir={out_dir}", "data.name=digits", "model.name=mlp",
                              "model.args={in_features: 64, hidden: [32], num_classes: 10}",
                              "optimizer.name=sgd", "optimizer.lr=0.05", "train.epochs=2",
                              "data.batch_size=16", "train.log_every_steps=1000", "logging.plot=false",
                              *overrides])


def train_body(out_dir, overrides=()):
    """Test body: train and return the summary (history included)."""
    from distrain.trainer.run import train

    return train(tiny_config(out_dir, *overrides))


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def one_epoch(cfg, patch, catch: type[BaseException]) -> dict:
    """Test body helper: an in-process Trainer, altered by `patch(trainer, backend)`, trains
    one epoch; returns its trainer's numbers and the `catch` error's message (or None).
    The trainer is freed before the backend goes down (DDP holds the process group), so
    `patch` must reach the trainer through its argument, not a closure of the caller's."""
    import gc

    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    patch(trainer, backend)
    error = None
    try:
        trainer.train_epoch(0)
    except catch as exc:
        error = str(exc)
    out = {"error": error, "step": trainer.global_step,
           "skipped": trainer.precision.skipped_steps, "schedule": trainer.schedule.steps,
           "lr": trainer.schedule.lr, "ema": flat(trainer.ema) if trainer.ema else None,
           "weights": flat(trainer.model)}
    del trainer
    gc.collect()
    backend.teardown()
    return out
