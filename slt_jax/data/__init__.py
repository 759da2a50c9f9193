"""Data on device and on disk: minibatches and the exact full-data loss
(:mod:`slt_jax.data.batches`), token sequences (:mod:`slt_jax.data.tokens`), and datasets
streamed from the host (:mod:`slt_jax.data.streaming`)."""

from slt_jax.data.streaming import Streamed, is_streamed, streamed
from slt_jax.data.tokens import (
    BYTE_VOCAB_SIZE,
    check_token_arrays,
    check_tokens,
    decode_bytes,
    encode_bytes,
    load_tokens,
    mask_path,
    save_tokens,
    token_data,
    tokens_from_text,
)

__all__ = [
    "BYTE_VOCAB_SIZE", "Streamed", "check_token_arrays", "is_streamed", "streamed",
    "check_tokens", "decode_bytes", "encode_bytes", "load_tokens",
    "mask_path", "save_tokens", "token_data", "tokens_from_text",
]
