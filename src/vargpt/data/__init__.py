"""Training data: reading and validating data files, and collating rows into model batches.

The shapes world (`vargpt.shapes`) generates such data procedurally, with an exact symbolic description of
every picture.
"""
