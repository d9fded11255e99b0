"""Training: stage freeze plans, SFT and DPO trainers, tokenizer training."""
