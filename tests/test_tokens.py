"""Token datasets (slt_jax.data): .npy round trips and memory maps, text to byte-level sequences,
checks that name the offending argument, and a memory-mapped dataset as estimate_llc's data.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slt_jax
from slt_jax import data as token_data_lib
from slt_jax.models.transformer import next_token_loss


def random_tokens(seed, n=64, length=8, vocab=5):
    return np.random.default_rng(seed).integers(0, vocab, (n, length)).astype(np.int32)


def test_save_and_load_round_trip_as_memory_maps(tmp_path):
    tokens = random_tokens(0)
    mask = np.random.default_rng(1).random(tokens.shape) < 0.5
    written = token_data_lib.save_tokens(tmp_path / "train.npy", {"tokens": tokens, "mask": mask})
    assert written == [tmp_path / "train.npy", tmp_path / "train.mask.npy"]
    loaded = token_data_lib.load_tokens(tmp_path / "train.npy", vocab_size=5, context_length=8)
    assert isinstance(loaded["tokens"], np.memmap) and isinstance(loaded["mask"], np.memmap)
    np.testing.assert_array_equal(loaded["tokens"], tokens)
    np.testing.assert_array_equal(loaded["mask"], mask)
    # Saving without a mask removes a stale one, so it is not loaded with other tokens.
    token_data_lib.save_tokens(tmp_path / "train.npy", {"tokens": tokens[:10]})
    again = token_data_lib.load_tokens(tmp_path / "train.npy", mmap=False)
    assert set(again) == {"tokens"} and not isinstance(again["tokens"], np.memmap)
    np.testing.assert_array_equal(again["tokens"], tokens[:10])


def test_tokens_from_text_cuts_utf8_bytes_into_sequences(tmp_path):
    text = "héllo wörld, tokens!\n" * 3  # 23 bytes per line (é and ö take two)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    raw = text.encode("utf-8")
    plain = token_data_lib.tokens_from_text(path, context_length=10)
    assert plain["tokens"].dtype == np.int32 and plain["tokens"].shape == (len(raw) // 10, 10)
    np.testing.assert_array_equal(plain["tokens"].reshape(-1), np.frombuffer(raw[:60], np.uint8))
    strided = token_data_lib.tokens_from_text(path, context_length=10, stride=4)
    assert strided["tokens"].shape == ((len(raw) - 10) // 4 + 1, 10)
    assert token_data_lib.decode_bytes(strided["tokens"][1]) == raw[4:14].decode("utf-8")
    assert token_data_lib.decode_bytes(token_data_lib.encode_bytes(text)) == text
    token_data_lib.check_tokens(strided, vocab_size=token_data_lib.BYTE_VOCAB_SIZE, context_length=10)


@pytest.mark.parametrize("call, match", [
    (lambda: token_data_lib.check_tokens({"tokens": np.array([[0, 1, 5]])}, vocab_size=5),
     r"data\['tokens'\] holds token id 5, outside \[0, vocab_size=5\)"),
    (lambda: token_data_lib.check_tokens({"tokens": np.array([[0, -1, 2]])}, vocab_size=5),
     r"data\['tokens'\] holds token id -1, outside \[0, vocab_size=5\)"),
    (lambda: token_data_lib.check_tokens({"tokens": np.zeros((2, 3), np.int32), "mask": np.ones((2, 4))}, 5),
     r"data\['mask'\] has shape \(2, 4\) but data\['tokens'\] has shape \(2, 3\)"),
    (lambda: token_data_lib.check_tokens({"tokens": np.zeros((2, 9), np.int32)}, 5, context_length=8),
     r"data\['tokens'\] has sequences of length 9, longer than context_length=8"),
    (lambda: token_data_lib.check_tokens({"tokens": np.zeros((2, 3), np.float32)}, 5),
     r"data\['tokens'\] must hold integer token ids, got dtype float32"),
    (lambda: token_data_lib.check_tokens({"x": np.zeros((2, 3), np.int32)}, 5),
     r"data must be a dict with a 'tokens' array \(and optionally 'mask'\), got \['x'\]"),
    (lambda: token_data_lib.tokens_from_text(__file__, context_length=1),
     r"context_length must be at least 2"),
    (lambda: token_data_lib.tokens_from_text(__file__, context_length=10**9),
     r"path=.* holds \d+ bytes, fewer than context_length=1000000000"),
    (lambda: token_data_lib.tokens_from_text(__file__, context_length=8, stride=0),
     r"stride must be a positive integer, got 0"),
    (lambda: token_data_lib.decode_bytes([300]), r"ids must lie in \[0, 256\)"),
])
def test_bad_token_data_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


VOCAB, LENGTH = 5, 8


def bigram_loss(params, batch):
    """A bigram language model, logits = W[token]: the data path, not a model, is under test."""
    return next_token_loss(params["w"][batch["tokens"]], batch["tokens"], batch.get("mask"))


@pytest.mark.parametrize("seed", [0, 1])
def test_a_memory_mapped_dataset_is_data_for_estimate_llc(tmp_path, seed):
    rng = np.random.default_rng(seed)
    tokens = random_tokens(seed, n=256, length=LENGTH, vocab=VOCAB)
    mask = np.ones_like(tokens, bool)
    mask[:, : LENGTH // 2] = False  # score the second half: every sequence scores equally many tokens
    token_data_lib.save_tokens(tmp_path / "d.npy", {"tokens": tokens, "mask": mask})
    data = token_data_lib.load_tokens(tmp_path / "d.npy", vocab_size=VOCAB, context_length=LENGTH)
    params = {"w": jnp.asarray(rng.normal(size=(VOCAB, VOCAB)), jnp.float32)}
    in_memory = {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask)}
    run = dict(step_size=1e-4, localization=10.0, num_chains=2, num_draws=20, num_burnin=0, batch_size=32,
               progress=False)
    mapped = slt_jax.estimate_llc(bigram_loss, params, data, jax.random.key(seed), **run)
    plain = slt_jax.estimate_llc(bigram_loss, params, in_memory, jax.random.key(seed), **run)
    assert mapped.n == 256 and mapped.nbeta == pytest.approx(256 / math.log(256))  # n counts sequences
    np.testing.assert_array_equal(mapped.llc_trace, plain.llc_trace)  # same rows, same chains
    assert mapped.init_loss == pytest.approx(float(bigram_loss(params, in_memory)), rel=1e-6)
