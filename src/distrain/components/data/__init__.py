"""Data: data sets and their layout-invariant epoch plan (datasets.py), samplers and the
training loader that yields each rank's micro-batches (loader.py).
"""
