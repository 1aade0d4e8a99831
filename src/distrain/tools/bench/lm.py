"""The GPU case of `distrain bench`: a GPT-2-small-sized language model on synthetic tokens,
distrain's training step against a plain loop a user would write (same model, data, seed,
AdamW settings and precision; the loop keeps torch's default foreach AdamW, distrain fuses
it on CUDA), one process. distrain runs twice: as configured by default (the NaN/inf skip
decided on the device), and with train.skip_nonfinite_steps=false (no check at all). Reports
tokens/s of each arm, their peak memory and their model FLOPs utilisation (MFU).

    python -m distrain.tools.bench.worker lm OUT.json '{"out_dir": "/tmp/lm"}'

On the CPU (no CUDA) it runs too, in a tiny size: the tests check it that way.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn.functional as F

# Dense bf16 tensor-core peak by device name (vendor datasheets, SXM parts): MFU's yardstick.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362e12,
                   "L4": 121e12, "A10": 125e12}

GPT2_SMALL = {"vocab_size": 50304, "n_layer": 12, "n_head": 12, "n_embd": 768}


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops, name
    return None, name


def lm(args: dict) -> dict:
    from distrain.components.data.datasets import epoch_plan
    from distrain.components.models import gpt
    from distrain.config import load_config
    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    model_args = {**GPT2_SMALL, **args.get("model", {}), "block_size": args.get("seq_len", 1024)}
    seq, batch, steps = model_args["block_size"], args.get("batch", 16), args.get("steps", 8)
    precision, lr = args.get("precision", "bf16"), 6e-4
    yaml_dict = "{" + ", ".join(f"{k}: {v}" for k, v in model_args.items()) + "}"
    overrides = [
        f"run.out_dir={args['out_dir']}", f"run.device={args.get('device', 'auto')}",
        "checkpoint.resume=none", "logging.plot=false", "checkpoint.save_last=false",
        "checkpoint.save_best=false", "train.log_every_steps=100000", "data.name=tokens",
        f"data.args={{n: {batch * steps}, seq_len: {seq}, "
        f"vocab_size: {model_args['vocab_size']}, val: 1}}", f"data.batch_size={batch}",
        "model.name=gpt", f"model.args={yaml_dict}", "loss.name=cross_entropy",
        "optimizer.name=adamw", f"optimizer.lr={lr}", "optimizer.weight_decay=0.1",
        f"train.precision={precision}"]
    cfg = load_config(None, overrides)
    backend = make_backend(cfg)
    backend.setup()
    device = backend.device
    trainer = Trainer(cfg, backend)
    # The same, without the per-step NaN/inf check (train.skip_nonfinite_steps=false).
    unchecked = Trainer(load_config(None, [*overrides, "train.skip_nonfinite_steps=false"]),
                        backend)
    torch.manual_seed(cfg.run.seed)  # the same initial weights as the Trainer's model
    ref = gpt(**model_args).to(device)
    opt = torch.optim.AdamW(ref.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.999),
                            eps=1e-8)
    data, dtype = trainer.train_set, {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    arms = ("distrain", "distrain_unchecked", "reference")
    losses: dict[str, list[float]] = {arm: [] for arm in arms}

    def reference_epoch(epoch: int) -> None:  # the plain loop: nothing but the step
        plan = epoch_plan(len(data), epoch, seed=cfg.run.seed, shuffle=True, world_size=1,
                          rank=0, batch_size=batch, accum=1)
        total = torch.zeros((), device=device)
        for step in plan:
            index = torch.as_tensor(step.micro[0].indices)
            x = data.inputs[index].to(device, non_blocking=True)
            y = data.targets[index].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype):
                logits = ref(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        losses["reference"].append(total.item() / len(plan))

    def distrain_epoch(epoch: int) -> None:
        losses["distrain"].append(trainer.train_epoch(epoch)["train_loss"])

    def unchecked_epoch(epoch: int) -> None:
        losses["distrain_unchecked"].append(unchecked.train_epoch(epoch)["train_loss"])

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    peak: dict[str, list[int]] = {arm: [] for arm in arms}
    for epoch in range(args.get("rounds", 5) + 1):  # epoch 0 warms both up and is not counted
        for arm, fn in zip(arms, (distrain_epoch, unchecked_epoch, reference_epoch)):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            start = time.perf_counter()
            fn(epoch)
            sync()
            if epoch:
                times[arm].append(time.perf_counter() - start)
                peak[arm].append(torch.cuda.max_memory_allocated(device) if cuda else 0)
    mine = list(backend.unwrap(trainer.model).parameters())
    diff = max(float((p.float() - q.float()).abs().max()) for p, q in zip(mine, ref.parameters()))
    flops, name = peak_flops(device)
    tokens = len(data) * seq  # per epoch
    out = {"device": name, "model": model_args, "batch": batch, "steps_per_epoch": steps,
           "precision": precision, "tokens_per_epoch": tokens,
           "weights": sum(p.numel() for p in mine),
           "flops_per_token": ref.flops_per_token(seq), "peak_flops": flops,
           "epoch_s": times, "peak_memory_bytes": peak, "train_loss": losses,
           "weights_bitwise_equal": diff == 0.0, "weights_max_abs_diff": diff,
           # both models and optimizers stay resident while either arm runs
           "resident_bytes": torch.cuda.memory_allocated(device) if cuda else 0}
    del trainer, unchecked, ref, opt
    gc.collect()
    backend.teardown()
    return out
