"""dsvl2: DeepSeek-VL2 inference, exact against the official reference, on any machine."""

__version__ = "0.1.0"


def load(model="demo", **kwargs):
    """Load a model: a checkpoint folder, a Hugging Face id, or "demo" (see ``dsvl2.api.load``)."""
    from .api import load as _load

    return _load(model, **kwargs)


__all__ = ["load", "__version__"]
