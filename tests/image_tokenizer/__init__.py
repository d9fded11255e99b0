"""Tests of vargpt.image_tokenizer."""
