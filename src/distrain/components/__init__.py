"""Components: the parts of a training run (precision, optimizers, schedules, EMA, losses, models,
data, checkpoints, validation, observability). They may import config/ and distributed/; never engine, trainer/ or commands/.
"""
