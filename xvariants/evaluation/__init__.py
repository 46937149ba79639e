"""Evaluation procedures (perplexity over a split, baselines)."""
