"""nn.Modules of DeepSeek-VL2 (no I/O, no sampling): vision tower, projector, image-token
assembly, DeepSeek-V2 language model, and the KV-cache storage they read and write."""

from .cache import KVCache, StepContext
from .vl import DeepseekVL2

__all__ = ["DeepseekVL2", "KVCache", "StepContext"]
