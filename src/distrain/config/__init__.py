"""Typed, strict configuration: defaults < YAML file < command-line `section.key=value`.

sections.py holds the typed sections (each field's default, documentation, bound and
whether a resume may change it, as metadata), checks.py the checks of a whole config,
load.py the YAML and override parsing, schema.py the generated reference. Mistakes raise
`ConfigError` naming the key path, what was given and what was expected; the CLI prints it
and exits with status 2. Imports only errors; every layer above may import it.
"""

from distrain.config.checks import MONITORABLE, VAL_METRICS, check_values
from distrain.config.load import config_from_dict, dump_yaml, load_config, parse_override, upgrade
from distrain.config.sections import (
                                      AugmentConfig,
                                      CheckpointConfig,
                                      Config,
                                      DataConfig,
                                      DistConfig,
                                      FSDPConfig,
                                      HorovodConfig,
                                      LoggingConfig,
                                      LossConfig,
                                      ModelConfig,
                                      OptimizerConfig,
                                      ProfileConfig,
                                      RunConfig,
                                      SamplerConfig,
                                      SchedulerConfig,
                                      TrainConfig,
                                      ValidateConfig,
                                      field_docs,
                                      metric_mode,
                                      resumable_keys,
                                      settings,
)
from distrain.errors import ConfigError

__all__ = ["AugmentConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "DistConfig", "FSDPConfig", "HorovodConfig", "LoggingConfig", "LossConfig",
           "MONITORABLE", "ModelConfig", "OptimizerConfig", "ProfileConfig", "RunConfig",
           "SamplerConfig", "SchedulerConfig", "TrainConfig", "VAL_METRICS", "ValidateConfig",
           "check_values", "config_from_dict", "dump_yaml", "field_docs", "load_config",
           "metric_mode", "parse_override", "resumable_keys", "settings", "upgrade"]
