"""dsvl2: DeepSeek-VL2 inference, exact against the official reference, on any machine."""

__version__ = "0.1.0"
