"""vjepa_fast: fast, verified V-JEPA video pretraining."""
from .checkpoint import import_official, load_encoder
from .config import Config, load_config
from .model import VJEPA

__all__ = ["Config", "VJEPA", "import_official", "load_config", "load_encoder"]
