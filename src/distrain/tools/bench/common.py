"""What the bench cases share: the small synthetic MLP job most of them time."""

from __future__ import annotations


def bench_config(args: dict, *extra: str):
    """The synthetic MLP job of a bench case (`args`: out_dir, hidden, n, batch)."""
    from distrain.config import load_config

    hidden = args.get("hidden", [1024, 1024])
    return load_config(None, [
        f"run.out_dir={args['out_dir']}", "checkpoint.resume=none", "logging.plot=false",
        "data.name=synthetic", f"data.args={{n: {args.get('n', 4096)}, features: 64}}",
        "model.name=mlp", f"model.args={{in_features: 64, hidden: {hidden}, num_classes: 10}}",
        "optimizer.name=sgd", "optimizer.lr=0.01", f"data.batch_size={args.get('batch', 64)}",
        "train.log_every_steps=100000", "checkpoint.save_last=false",
        "checkpoint.save_best=false", *extra])
