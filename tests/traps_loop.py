"""A user's own loop on distrain.Engine, shaped the way hand-written loops are (issue 22):
run as `python|torchrun|horovodrun ... tests/traps_loop.py OUT MODE [EPOCHS] [STOP_AT]`.

MODE plateau: a ReduceLROnPlateau built before eng.setup (as examples/own_loop.py does),
  stepped on a metric that never improves; checkpoints every epoch; STOP_AT: stop after that
  epoch (a crash), a later run resumes with load_checkpoint(). Writes rank 0's LR per epoch.
MODE steplr, onecycle: the same with a StepLR built before eng.setup (stepped per epoch), a
  OneCycleLR built after it on the optimizer it returned (stepped per optimizer step).
MODE streams: NumPy's and Python's random draws every step (np.random.beta for a Mixup
  factor, random.random), saved every 5 steps; STOP_AT: stop after that step; the draws
  are written per rank.
MODE modulo: steps on `(i + 1) % accum == 0` only (the trap of the short last window).
MODE unpolled: never calls should_stop; sends itself SIGTERM at step 3.
MODE skip: rejects every 4th global batch (eng.skip_step() where eng.step would go, on
  every rank alike); writes whether each skip left the weights and gradients as they were.
MODE vote: the same steps dropped by eng.step(opt, skip=wish), where one rank alone (a
  different one each time) wishes it: every rank skips.
MODE lonely: rank 0 alone calls skip_step (a misuse); eng.audit() at the end names it.
MODE api: the collectives and helpers a loop reaches for (all_reduce, all_gather, any,
  main_process_first, open, register of a dict, autocast), written per rank; no training.
MODE adasum: Engine(strategy=distrain.Horovod(op="adasum")); skip_step is refused where due.
MODE hold: holds the run folder (Engine(out_dir=OUT)) until OUT/release exists.
"""

import json
import os
import random
import signal
import sys
import time

import numpy as np
import torch
from torch.utils.data import TensorDataset

import distrain

out, mode = sys.argv[1], sys.argv[2]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
stop_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
accum = 4 if mode == "modulo" else 2
strategy = distrain.Horovod(op="adasum") if mode == "adasum" else None
eng = distrain.Engine(accum=accum, seed=5, out_dir=out, strategy=strategy)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
schedulers = torch.optim.lr_scheduler
sched = schedulers.StepLR(optimizer, step_size=1, gamma=0.5) if mode == "steplr" else \
    schedulers.ReduceLROnPlateau(optimizer, factor=0.5, patience=0)  # built before setup
model, opt = eng.setup(model, optimizer)
g = torch.Generator().manual_seed(1)
data = TensorDataset(torch.randn(150, 8, generator=g), torch.randint(0, 3, (150,), generator=g))
loader = eng.loader(data, batch_size=8)
if mode == "onecycle":  # built after setup, on the optimizer it returned
    sched = schedulers.OneCycleLR(opt, max_lr=0.2, total_steps=epochs * len(loader))
eng.register("sched", sched)
per_epoch = mode in ("plateau", "steplr", "onecycle")
resumed = eng.load_checkpoint() if per_epoch or mode == "streams" else None
if mode == "api":
    mine = torch.tensor([float(eng.rank + 1)])
    firsts = []
    with eng.main_process_first():  # rank 0 makes the file, the others find it made
        if eng.is_main:
            time.sleep(0.5)
            with open(f"{out}/made-by-rank-0", "w") as f:
                f.write("x")
        firsts.append(os.path.exists(f"{out}/made-by-rank-0"))
    with eng.open(f"{out}/results.csv") as f:
        f.write(f"written by rank {eng.rank}\n")
    progress = {"iteration": 7, "name": "warmup"}
    eng.register("progress", progress)
    eng.save_checkpoint(f"{out}/api.pt")
    progress.update(iteration=0, name="changed")
    eng.load_checkpoint(f"{out}/api.pt")
    with eng.autocast():
        dtype = str(model(torch.randn(2, 8)).dtype)
    report = {"sum": eng.all_reduce(mine.clone()).item(),
              "max": eng.all_reduce(mine.clone(), op="max").item(),
              "gathered": [g.item() for g in eng.all_gather(mine)],
              "objects": eng.all_gather({"rank": eng.rank}),
              "any_last": eng.any(eng.rank == eng.world_size - 1), "any_none": eng.any(False),
              "first": firsts, "progress": progress, "local_rank": eng.local_rank,
              "dtype": dtype}
    with open(f"{out}/api.rank{eng.rank}.json", "w") as f:
        json.dump(report, f)
    eng.close()
    sys.exit(0)
lrs, draws, skips = [], [], []
while mode == "hold" and not os.path.exists(f"{out}/release"):
    print("holding", flush=True)
    time.sleep(0.2)
while loader.epoch < epochs:
    for i, (x, y) in enumerate(loader):
        eng.backward(torch.nn.functional.cross_entropy(model(x), y))
        if mode == "modulo" and (i + 1) % accum != 0:
            continue
        if mode != "modulo" and not eng.step_due:
            continue
        due = eng.global_step % 4 == 2
        if mode == "vote" or (mode == "lonely" and eng.rank != 0):
            before = [p.detach().clone() for p in model.parameters()]
            wish = due and eng.rank == eng.global_step % eng.world_size
            if not eng.step(opt, skip=wish if mode == "vote" else None).taken():
                skips.append({"step": eng.global_step, "grads_none": True, "unchanged": all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters()))})
            continue
        if mode == "adasum" and due:
            try:
                eng.skip_step()
            except distrain.MisuseError as e:  # Adasum moved the weights in backward
                skips.append({"step": eng.global_step, "refused": str(e)})
        if mode in ("skip", "lonely") and due:
            before = [p.detach().clone() for p in model.parameters()]
            eng.skip_step()
            skips.append({"step": eng.global_step, "grads_none": all(
                p.grad is None or not p.grad.any() for p in model.parameters()),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters()))})
            continue
        eng.step(opt)
        if mode == "onecycle":
            sched.step()
        if mode == "streams":
            draws.append((eng.global_step, float(np.random.beta(0.4, 0.4)), random.random()))
            if eng.global_step % 5 == 0:
                eng.save_checkpoint()
            if eng.global_step == stop_at:
                break
        if mode == "unpolled" and eng.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends before its SIGKILL
    else:
        if per_epoch:
            if mode == "plateau":
                sched.step(1.0)  # never improves: the LR halves every epoch
            elif mode == "steplr":
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
            eng.save_checkpoint()
            if loader.epoch == stop_at:
                break
        continue
    break  # streams: stopped mid-epoch
if mode == "lonely":
    eng.audit()  # the ranks' weights differ now: DivergenceError on every rank
tag = "resumed" if resumed else "straight"
with open(f"{out}/{mode}.{tag}.rank{eng.rank}.json", "w") as f:
    json.dump({"lrs": lrs, "draws": draws, "step": eng.global_step, "skips": skips,
               "skipped": eng.skipped_steps,
               "weights": [p.detach().flatten().tolist() for p in model.parameters()]}, f)
eng.close()
print(f"finished {mode} at step {eng.global_step}", flush=True)
