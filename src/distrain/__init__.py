"""distrain: one YAML, one training loop, any number of processes; or your own loop through
`distrain.Engine` (see distrain/engine.py)."""

__version__ = "0.1.0"

__all__ = ["Engine", "DDP", "FSDP", "Horovod", "Checkpoints", "MisuseError", "__version__"]


def __getattr__(name: str):
    # Lazy: `import distrain` (the CLI's first step) should not import torch.
    if name in ("DDP", "FSDP", "Horovod"):
        from distrain.distributed import strategy

        return getattr(strategy, name)
    if name == "Checkpoints":
        from distrain.components.checkpoint.store import Checkpoints

        return Checkpoints
    if name == "Engine":
        from distrain.engine import Engine

        return Engine
    if name == "MisuseError":
        from distrain.errors import MisuseError

        return MisuseError
    raise AttributeError(f"module 'distrain' has no attribute {name!r}")
