"""distrain: one YAML, one training loop, any number of processes."""

__version__ = "0.1.0"
