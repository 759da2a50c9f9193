"""Data on device: minibatches, the exact full-data loss, and token datasets."""
