"""Processing: conversations and images -> token ids, masks and pixel tiles (pure CPU).

* ``conversation``: message formats -> normalised turns -> prompt pieces
* ``tokenizer``: ``tokenizer.json`` through the ``tokenizers`` library
* ``image``: loading, candidate resolution, tiling, normalisation
* ``processor``: one conversation or many -> ``BatchInputs`` (left-padded)
"""

from .conversation import Turn, normalize_conversation, prompt_pieces
from .image import load_image, num_image_tokens, select_best_resolution
from .processor import BatchInputs, Processor
from .tokenizer import Tokenizer

__all__ = [
    "Processor",
    "BatchInputs",
    "Tokenizer",
    "Turn",
    "load_image",
    "select_best_resolution",
    "num_image_tokens",
    "normalize_conversation",
    "prompt_pieces",
]
