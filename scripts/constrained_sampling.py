"""A stand-in for a model under a constraint: random tokens from random logits, restricted to the
constraint's mask, fed back through `accept` — the engine's contract, in numpy. The constraint
tests and scripts/bench_grammar.py drive OutputConstraints with it.

Uniformly random tokens would walk through an unbounded string or number for ever (most tokens
continue one), so on half of the steps the draw is among the allowed tokens without letters or
digits (quotes, brackets, commas, control tokens), which is what ends things. Every token still
comes from the mask: the walks test what the grammar lets through, not what a model would say."""

from __future__ import annotations

import numpy as np


def allowed(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Boolean [vocab_size]: the tokens a bitmask allows."""
    return np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class RandomModel:
    def __init__(self, tokenizer, vocab_size: int, seed: int, *, free_text: list[int] | None = None):
        """`free_text`: token ids to write (cycled) while the constraint leaves the output free."""
        self.vocab_size = vocab_size
        self.rng = np.random.default_rng(seed)
        self.free_text = free_text or []
        self._free_at = 0
        plain = np.zeros(vocab_size, bool)
        for i in range(tokenizer.n_vocab):
            data = tokenizer.token_bytes(i)
            plain[i] = i >= tokenizer.num_base_tokens or (data.isascii() and not any(chr(c).isalnum() for c in data))
        self.plain = plain

    def next_token(self, mask: np.ndarray | None) -> int:
        if mask is None:
            token = self.free_text[self._free_at % len(self.free_text)]
            self._free_at += 1
            return token
        ok = allowed(mask, self.vocab_size)
        assert ok.any(), "the mask allows no token"
        if self.rng.random() < 0.5 and (ok & self.plain).any():
            ok &= self.plain
        return int(np.argmax(np.where(ok, self.rng.gumbel(size=self.vocab_size), -np.inf)))


class Refused(AssertionError):
    """A scripted token that the constraint's mask does not allow."""


class Gate:
    """The engine's side of a constraint: the mask is asked for at the start, after every masked
    token and after every token of `breaks` (while it is None, free tokens follow one another);
    every token goes to `accept`. With no constraint, everything passes."""

    def __init__(self, constraint, vocab_size: int):
        self.constraint, self.vocab_size = constraint, vocab_size
        self.mask = constraint.mask() if constraint is not None else None

    def allows(self, token: int) -> bool:
        return self.mask is None or bool(allowed(self.mask, self.vocab_size)[token])

    def take(self, token: int) -> None:
        """Hand the constraint a token; raise Refused if the current mask does not allow it."""
        if self.constraint is None:
            return
        if not self.allows(token):
            raise Refused(f"the grammar refuses token {token}")
        self.constraint.accept(token)
        if self.mask is not None or token in self.constraint.breaks:
            self.mask = self.constraint.mask()


def generate(constraint, model: RandomModel, stop_ids, max_steps: int = 20_000) -> list[int]:
    """Tokens until a stop token (included) or max_steps, made under the engine's contract."""
    gate, tokens = Gate(constraint, model.vocab_size), []
    while len(tokens) < max_steps:
        token = model.next_token(gate.mask)
        gate.take(token)
        tokens.append(token)
        if token in stop_ids:
            break
    return tokens
