"""Semantic correspondence by prompt optimisation (Hedlin et al., NeurIPS 2023)."""
