"""fastssl: fast self-supervised learning for vision."""
__version__ = "0.1.0"
