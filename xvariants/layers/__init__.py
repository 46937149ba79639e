"""Plain ``torch.nn`` building blocks; nothing here imports Lightning or Hydra."""

from xvariants.layers.attention import DecodingCache, KVCache, MultiHeadAttention, attention_mask
from xvariants.layers.block import TransformerBlock
from xvariants.layers.feedforward import FeedForward
from xvariants.layers.hooks import HookPoint
from xvariants.layers.positions import LearnedPositions, SinusoidalPositions, build_positions, sinusoid_table
from xvariants.layers.rotary import RotaryEmbedding

__all__ = [
    "DecodingCache",
    "FeedForward",
    "HookPoint",
    "KVCache",
    "LearnedPositions",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "TransformerBlock",
    "attention_mask",
    "build_positions",
    "sinusoid_table",
]
