"""Magnitude pruning: masks (unstructured, N:M, block) and structured removal of heads and FFN neurons."""
