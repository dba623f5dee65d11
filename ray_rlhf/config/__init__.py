"""Config: one typed tree (:mod:`.schema`), loaded from a preset or YAML file plus dotted overrides."""

from ray_rlhf.config.load import PRESETS_DIR, load_config, preset_names, to_yaml
from ray_rlhf.config.schema import RunConfig

__all__ = ["RunConfig", "load_config", "preset_names", "to_yaml", "PRESETS_DIR"]
