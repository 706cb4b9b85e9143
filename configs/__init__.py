"""Config schema, presets and loading, shared by every stage."""

from .errors import UserInputError
from .loading import apply_overrides, config_to_yaml, load_config, load_scoring_config, preset_path, validate_config
from .schema import RadsynthConfig

__all__ = ["RadsynthConfig", "UserInputError", "apply_overrides", "config_to_yaml", "load_config", "load_scoring_config",
           "preset_path", "validate_config"]
