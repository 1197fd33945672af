"""Checkpoints: reading the official layout, writing random and quantised ones, finding them."""
