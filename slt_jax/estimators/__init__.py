"""Estimators: pure functions of sampled statistics (they never run a sampler)."""
