"""Sketching: learn codebooks + codes for every linear layer of a decoder, layer by layer."""
