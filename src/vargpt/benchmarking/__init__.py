"""Machinery behind `vargpt bench` and the benchmark samplers: resumable sampling, FLOP counts, timing."""
