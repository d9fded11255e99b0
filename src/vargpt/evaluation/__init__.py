"""Evaluation of any model: GenEval and DPG-Bench (sampling and judges), teacher-forced fit, lmms-eval.

The shapes world's exact detector and scores live in `vargpt.shapes`.
"""
