"""The generation engine: sampling, the step loop of token ids, streaming detokenisation.

* ``sampling``: ``SamplingParams`` and the pure batched sampler
* ``detokenize``: incremental UTF-8-safe detokeniser, stop strings
* ``engine``: KV-cache slots, prefill (whole / chunked), batched decode, continuous batching

The names below load on first use (PEP 562), so that ``import dsvl2`` can reach
``engine.heap`` without importing torch.
"""

_NAMES = {"Engine": "engine", "GenerationOutput": "engine", "StreamEvent": "engine", "SamplingParams": "sampling"}

__all__ = list(_NAMES)


def __getattr__(name: str):
    if name not in _NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
