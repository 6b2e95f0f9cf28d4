"""V-JEPA networks: the video ViT encoder and the predictor."""
from .pos_embed import sincos_1d, sincos_3d
from .predictor import Predictor
from .vit import Attention, Block, VisionTransformer, gather_tokens

__all__ = ["Attention", "Block", "Predictor", "VisionTransformer", "gather_tokens", "sincos_1d", "sincos_3d"]
