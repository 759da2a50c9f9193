"""Reading curves over training: stage boundaries and early-warning indicators."""
