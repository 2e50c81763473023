"""Attention-based video action recognition from an offline VGG-16 feature cache."""

__version__ = "0.1.0"
