"""Tools that drive whole runs: the benchmark suite (bench/) and the chaos run (chaos.py).
They may import anything below them; only commands/ imports them (`distrain bench`).
"""
