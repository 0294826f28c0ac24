"""Evaluation: perplexity and generation."""
