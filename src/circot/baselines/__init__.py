"""Baselines for the results table, trained and evaluated in the same harness as CIR-CoT.

- :mod:`circot.baselines.late_fusion`: the "VLM-based" late-fusion family (CLIP4Cir-style combiner over frozen
  EfficientNet-Lite0 image features and frozen all-MiniLM-L6-v2 text features).
"""
