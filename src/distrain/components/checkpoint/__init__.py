"""Checkpoints: files, markers and hashes at the bottom (files.py), the sharded writer above it
(sharded.py), and the store that lists, verifies, falls back and keeps N (store.py).
"""
