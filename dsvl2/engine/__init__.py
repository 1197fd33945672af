"""The generation engine: sampling, the step loop of token ids, streaming detokenisation.

* ``sampling``: ``SamplingParams`` and the pure batched sampler
* ``detokenize``: incremental UTF-8-safe detokeniser, stop strings
* ``engine``: KV-cache slots, prefill (whole / chunked), batched decode, continuous batching
"""

from .engine import Engine, GenerationOutput, StreamEvent
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationOutput", "StreamEvent", "SamplingParams"]
