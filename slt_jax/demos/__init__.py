"""Embedded examples behind ``slt-jax demo``: each builds its own data, runs, and reports."""
