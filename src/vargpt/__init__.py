"""vargpt: VARGPT-v1.1-style unified models for image understanding, generation and editing."""

__version__ = "0.1.0"
