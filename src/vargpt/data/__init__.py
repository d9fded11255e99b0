"""Training data: reading and validating data files, and collating rows into model batches."""
