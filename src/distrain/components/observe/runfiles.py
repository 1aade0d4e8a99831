"""The names of a run folder's files (`run.out_dir`), for the modules that write and read them."""

METRICS_FILE = "metrics.jsonl"  # one JSON line per epoch (and per mid-epoch validation)
CONFIG_FILE = "config.yaml"  # the resolved config
PLOT_FILE = "curves.png"  # the learning curves (logging.plot)
TENSORBOARD_DIR = "tensorboard"  # TensorBoard scalars (logging.tensorboard)
LOCK_FILE = ".distrain.lock"  # held by the live run's rank 0 (runlock.py)
TRACKERS_FILE = "trackers.json"  # the MLflow and W&B run ids, so a resumed run continues them
WANDB_DIR = "wandb"  # Weights & Biases' offline runs (logging.wandb)
PROFILE_DIR = "profile"  # torch.profiler traces (logging.profile)
