"""The config trainer (`distrain train`): builds components from a Config and drives them through
distrain.Engine. May import everything below it; only commands/ and tools/ import it.
"""
