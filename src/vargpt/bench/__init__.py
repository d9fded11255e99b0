"""Speed benchmarks (`vargpt bench`): timing, peak memory, FLOP counts and the cost plot."""
