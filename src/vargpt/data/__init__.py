"""Training data: reading and validating data files, and collating rows into model batches.

The shapes world (`vargpt.data.shapes`, `vargpt.data.shapes_dataset`) generates such data procedurally, with an
exact symbolic description of every picture.
"""
