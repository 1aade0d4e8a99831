"""The command line (`distrain train|evaluate|predict|export|plot|bench|config|check`) and
torchrun's exit-status wrapper. Nothing inside distrain imports a command.
"""
