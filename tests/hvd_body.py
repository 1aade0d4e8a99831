"""Test bodies run under `horovodrun -np 2 python tests/hvd_body.py NAME OUT [overrides...]`.

Each rank writes what it saw to OUT/NAME.rank<R>.pt for the test to compare.
"""

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402

from distrain.distributed import make_backend  # noqa: E402
from distrain.trainer.loop import Trainer  # noqa: E402


def synced_grads(out_dir, *overrides):
    """Train one epoch; record every rank's gradients right after Horovod's synchronize()."""
    cfg = tiny_config(out_dir, "dist.backend=horovod", "train.epochs=1", *overrides)
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    seen = []
    params = list(trainer.model.parameters())
    synchronize = backend.synchronize

    def spy(optimizer):
        synchronize(optimizer)
        seen.append(torch.cat([p.grad.flatten().clone() for p in params]))

    backend.synchronize = spy
    trainer.train_epoch(0)
    result = {"grads": seen, "skipped": trainer.precision.skipped_steps,
              "steps": trainer.global_step,
              "weights": torch.cat([p.detach().flatten() for p in params])}
    torch.save(result, Path(out_dir) / f"synced_grads.rank{backend.rank}.pt")
    del trainer
    gc.collect()
    backend.teardown()


if __name__ == "__main__":
    name, out, *rest = sys.argv[1:]
    {"synced_grads": synced_grads}[name](out, *rest)
