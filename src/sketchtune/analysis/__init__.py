"""Analyses of fine-tuning updates (paper §2.1 / §3)."""
