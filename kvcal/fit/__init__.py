"""Fitting: PCA bases, DP bit allocations and PyramidKV budgets from captured KV statistics."""
