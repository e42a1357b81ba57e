"""The run's one frozen config: its schema (schema.py), how it is read (load.py), the presets."""

from gptjax.config.load import (
    config_from_dict,
    config_to_dict,
    load_config,
    model_config,
    override_help,
    parse_overrides,
    replace_cfg,
    resolve_config_path,
)
from gptjax.config.schema import (
    PRESETS,
    SECTIONS,
    Config,
    DataConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
    check_sampling,
)

__all__ = [
    "PRESETS", "SECTIONS", "Config", "DataConfig", "MeshConfig", "ModelConfig", "OptimConfig",
    "SampleConfig", "TrainConfig", "check_sampling", "config_from_dict", "config_to_dict",
    "load_config", "model_config", "override_help", "parse_overrides", "replace_cfg",
    "resolve_config_path",
]
