"""The hand-built copy model of scripts/make_copy_model.py, which speculative decoding's benchmarks
stand on: it must continue repeated text, where the bundled nano model does not."""

import jax.numpy as jnp
import numpy as np
import pytest
from scripts_loader import load_script

from kimi_jax.chat import Tokenizer

make_copy_model = load_script("make_copy_model")


@pytest.fixture(scope="module")
def model():
    return make_copy_model.copy_model(Tokenizer.from_dir(make_copy_model.TOKENIZER), max_len=1024)


def test_copy_model_continues_a_repeated_random_sequence(model):
    rng = np.random.default_rng(3)
    first = rng.integers(0, 3840, (2, 120))
    seq = np.concatenate([first, first], axis=1)
    predicted = np.asarray(jnp.argmax(model.forward_no_cache(jnp.asarray(seq)), -1))
    context = make_copy_model.CONTEXT
    # Once the copy has CONTEXT tokens behind it, every next token is the one that followed them.
    assert np.mean(predicted[:, 120 + context - 1:-1] == seq[:, 120 + context:]) == 1.0
    # In the first half nothing repeats: what it predicts there is not the next token.
    assert np.mean(predicted[:, context:119] == seq[:, context + 1:120]) < 0.05


def test_copy_model_follows_an_edited_copy_from_the_edit_on(model):
    rng = np.random.default_rng(4)
    text = rng.integers(0, 3840, 80)
    edited = text.copy()
    edited[40] = (text[40] + 1) % 3840  # the copy differs in one token
    seq = np.concatenate([text, edited])[None]
    predicted = np.asarray(jnp.argmax(model.forward_no_cache(jnp.asarray(seq)), -1))[0]
    # Right before the edit it predicts the original token; CONTEXT tokens after it, it copies again.
    assert predicted[80 + 39] == text[40]
    after = 80 + 41 + make_copy_model.CONTEXT
    assert np.array_equal(predicted[after - 1:-1], seq[0, after:])
