"""dsvl2: DeepSeek-VL2 inference, exact against the official reference, on any machine."""

__version__ = "0.1.0"

from .engine import heap as _heap  # noqa: E402

# Threads started from here on share glibc's main malloc arena, whose freed memory the
# engine's steps reuse (engine/heap.py: a thread that allocates before this, e.g. torch's
# OpenMP workers, keeps an arena of its own, and the engine's threads may be handed it).
_heap.one_arena()


def load(model="demo", **kwargs):
    """Load a model: a checkpoint folder, a Hugging Face id, or "demo" (see ``dsvl2.api.load``)."""
    from .api import load as _load

    return _load(model, **kwargs)


__all__ = ["load", "__version__"]
