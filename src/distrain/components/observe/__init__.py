"""Observability: the run folder's files and its lock, the metrics log, plots, experiment
trackers and profiles. Imports config/ and components; never the engine or the trainer.
"""
