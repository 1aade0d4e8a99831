"""Every error distrain raises on purpose, in one place: commands catch them by class without
importing the modules that raise them. Imports nothing of distrain; anything may import it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in the configuration; its message names the key path."""


class RunLocked(ConfigError):
    """Another live run holds this run folder."""


class LabelError(ConfigError):
    """A label outside the model's outputs, found in this rank's batch (maybe this rank's
    alone, so it is reported by the rank that found it)."""


class PluginError(RuntimeError):
    """User code named in the config raised; the message names its key and says where."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the earlier ones are untouched."""


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients."""


class PlotError(ValueError):
    """A run folder that cannot be plotted; the message names it and says why."""


class MisuseError(RuntimeError):
    """The API was called in an order that would give wrong gradients or a hang."""


class Preempted(Exception):
    """Every rank stopped at the same step boundary after SIGTERM/SIGUSR1; last.pt holds it."""


class CollectiveInMainOnlyRegion(RuntimeError):
    """A collective was called where only rank 0 runs (it would have hung)."""


class DivergenceError(RuntimeError):
    """The ranks disagree on something every rank must agree on."""
