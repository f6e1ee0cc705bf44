"""What the scheduler hands the device each dispatch (scheduler.py makes them, engine.JaxDevice runs
them through the compiled steps of steps.py, tests/mock_device.py imitates them in numpy), and the
`Device` protocol itself. Plain Python: no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from kimi_jax.scheduler import Request


@dataclasses.dataclass
class PrefillWork:
    """One chunk: row i continues slot slots[i] from q_start[i] with n_valid[i] of tokens[i]."""

    tokens: np.ndarray  # [R, C] int32
    slots: np.ndarray  # [R] int32, max_batch for padding rows
    q_start: np.ndarray  # [R] int32
    n_valid: np.ndarray  # [R] int32
    finish_budget: np.ndarray  # [R] int32: tokens after the sampled one, or -1 (prompt continues)
    mask: np.ndarray | None  # [R, W] int32 bitmask words, or None when no row is constrained
    finishing: list[tuple[int, Request]]  # rows whose prompt ends here: their sampled token is theirs


@dataclasses.dataclass
class DecodeWork:
    """Up to `steps` decode steps for the slots rows[b] (max_batch pads)."""

    rows: np.ndarray  # [B] int32
    steps: int
    mask: np.ndarray | None  # [B, W] int32 (then steps is 1)
    requests: list[tuple[int, Request]]


@dataclasses.dataclass
class VerifyWork:
    """One verify step for the slots rows[b] (max_batch pads): row b feeds its token and the first
    n_draft[b] of drafts[b], and gets back the ones the model agrees with and one more."""

    rows: np.ndarray  # [B] int32
    drafts: np.ndarray  # [B, K] int32
    n_draft: np.ndarray  # [B] int32
    requests: list[tuple[int, Request]]
    drafted: dict  # request -> its draft


class Device(Protocol):
    """What the scheduler needs from the compiled programs (engine.JaxDevice; tests: a mock)."""

    vocab_size: int

    def set_table(self, table: np.ndarray) -> None: ...
    def set_knobs(self, knobs: dict) -> None: ...
    def prefill(self, work: PrefillWork) -> object: ...
    def decode(self, work: DecodeWork) -> object: ...
    def verify(self, work: VerifyWork) -> object: ...
    def resume(self, slots: list[int]) -> None: ...
    def read(self, handle) -> np.ndarray: ...
