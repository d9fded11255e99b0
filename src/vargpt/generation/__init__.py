"""Decoding: text by next-token prediction, images by next-scale prediction, and their settings."""
