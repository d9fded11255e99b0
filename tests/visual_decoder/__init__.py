"""Tests of the visual decoder."""
