"""Kimi K2 tokenizer: a tiktoken byte-level BPE plus 256 special slots (docs/k2-format.md §5).

Mirrors K2's `tokenization_kimi.py` (class `TikTokenTokenizer`) closely enough for token-exact
prompts, without transformers: regular tokens are the ranks of `tiktoken.model`, and the 256 ids
right after them are special slots named from `tokenizer_config.json`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import operator
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import tiktoken

from kimi_jax.errors import KimiError

VOCAB_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

K2_NUM_BASE_TOKENS = 163_584
NUM_SPECIAL_SLOTS = 256


class SpecialToken(NamedTuple):
    name: str
    k2_id: int  # id in the real K2 vocab; other vocabularies shift it by their own base size
    special: bool  # `special` flag in added_tokens_decoder: False survives skip_special decoding


# K2's named special tokens (docs/k2-format.md §5). The reader, the writer and the output parser all use this
# one table; every slot not listed is `<|reserved_token_{id}|>`.
K2_SPECIAL_TOKENS = (
    SpecialToken("[BOS]", 163584, True),
    SpecialToken("[EOS]", 163585, True),
    SpecialToken("<|im_end|>", 163586, True),
    SpecialToken("<|im_user|>", 163587, True),
    SpecialToken("<|im_assistant|>", 163588, True),
    SpecialToken("<|start_header_id|>", 163590, True),
    SpecialToken("<|end_header_id|>", 163591, True),
    SpecialToken("[EOT]", 163593, True),
    SpecialToken("<|im_system|>", 163594, True),
    # Tool-call markers are special=false in K2's config so that parsers still see them after
    # decoding with skip_special_tokens=True.
    SpecialToken("<|tool_calls_section_begin|>", 163595, False),
    SpecialToken("<|tool_calls_section_end|>", 163596, False),
    SpecialToken("<|tool_call_begin|>", 163597, False),
    SpecialToken("<|tool_call_argument_begin|>", 163598, False),
    SpecialToken("<|tool_call_end|>", 163599, False),
    SpecialToken("<|im_middle|>", 163601, True),
    # Media tokens come from K2.5-era tables; text-only K2 never emits them, flags are a guess.
    SpecialToken("<|media_begin|>", 163602, True),
    SpecialToken("<|media_content|>", 163603, True),
    SpecialToken("<|media_end|>", 163604, True),
    SpecialToken("<|media_pad|>", 163605, True),
    # GUESS (spec: flags UNVERIFIED): special=false, as DeepSeek-R1 does, so that text decoded with
    # skip_special keeps the reasoning delimiters that the output parser needs.
    SpecialToken("<think>", 163606, False),
    SpecialToken("</think>", 163607, False),
    SpecialToken("[UNK]", 163838, True),
    SpecialToken("[PAD]", 163839, True),
)

BOS, EOS, IM_END, THINK_START, THINK_END = "[BOS]", "[EOS]", "<|im_end|>", "<think>", "</think>"

ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>", "<|end_header_id|>",
    "[EOT]", "<|im_system|>", "<|im_middle|>",
)

# The `&&` class intersections need fancy-regex, which tiktoken uses, so K2's pattern is taken as is.
_LETTERS_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LETTERS_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
PAT_STR = "|".join([
    r"[\p{Han}]+",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}*{_LETTERS_LOWER}+{_CONTRACTIONS}",
    rf"[^\r\n\p{{L}}\p{{N}}]?{_LETTERS_UPPER}+{_LETTERS_LOWER}*{_CONTRACTIONS}",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# tiktoken's Rust BPE panics (stack overflow) on very long runs; K2 cuts the text the same way,
# and the cut points matter for token-exact parity on such inputs.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000
_RUN = re.compile(r"\s+|\S+")


def _split_long_runs(text: str) -> Iterable[str]:
    """Cut `text` so no run of whitespace or non-whitespace exceeds _MAX_RUN_CHARS chars."""
    start = 0
    for run in _RUN.finditer(text):
        for cut in range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS):
            yield text[start:cut]
            start = cut
    yield text[start:]


def byte_level_ranks() -> dict[bytes, int]:
    """The 256 single-byte tokens as ranks 0..255: the smallest valid tiktoken BPE."""
    return {bytes([b]): b for b in range(256)}


class Tokenizer:
    """K2 tokenizer. Build it with `Tokenizer.from_dir(checkpoint_dir)`."""

    def __init__(self, mergeable_ranks: dict[bytes, int], config: dict, *, source: str = CONFIG_FILE):
        self.num_base_tokens = len(mergeable_ranks)
        self.n_vocab = self.num_base_tokens + NUM_SPECIAL_SLOTS
        self._ranks = mergeable_ranks
        named = _special_slots(config, self.num_base_tokens, source)
        self._names: dict[int, str] = {}
        self._special: set[int] = set()
        for slot in range(self.num_base_tokens, self.n_vocab):
            name, special = named.get(slot, (f"<|reserved_token_{slot}|>", True))
            self._names[slot] = name
            if special:
                self._special.add(slot)
        self._ids = {name: i for i, name in self._names.items()}
        if len(self._ids) != NUM_SPECIAL_SLOTS:
            raise KimiError(f"{source}: added_tokens_decoder names the same token twice")
        self._enc = tiktoken.Encoding(
            "kimi_k2", pat_str=PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=self._ids
        )
        self.bos_id = self._named_id(_token_name(config.get("bos_token"), BOS, source), source)
        self.eos_id = self._named_id(_token_name(config.get("eos_token"), EOS, source), source)
        self.im_end_id = self._named_id(IM_END, source)
        # docs/k2-format.md §8: stop on <|im_end|>, and on [EOS] for safety.
        self.stop_ids = tuple(dict.fromkeys((self.im_end_id, self.eos_id)))
        self.think_start_id = self._ids.get(THINK_START)
        self.think_end_id = self._ids.get(THINK_END)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        ranks = _read_ranks(path / VOCAB_FILE)
        config_file = path / CONFIG_FILE
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise KimiError(f"{config_file}: tokenizer config not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise KimiError(f"{config_file}: cannot read tokenizer config ({e})") from None
        if not isinstance(config, dict):
            raise KimiError(f"{config_file}: expected a JSON object")
        return cls(ranks, config, source=str(config_file))

    def _named_id(self, name: str, source: str) -> int:
        if name not in self._ids:
            raise KimiError(f"{source}: special token {name} is not in the special slots")
        return self._ids[name]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings stay plain text unless allow_special is set,
        so user or tool text cannot inject control tokens."""
        ids: list[int] = []
        for i in range(0, len(text), _MAX_ENCODE_CHARS):
            chunk = text[i : i + _MAX_ENCODE_CHARS]
            pieces = (chunk,) if len(chunk) <= _MAX_RUN_CHARS else _split_long_runs(chunk)
            for piece in pieces:
                if allow_special:
                    ids.extend(self._enc.encode(piece, allowed_special="all"))
                else:
                    ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops control tokens but keeps the tool-call markers and the
        think tags, whose `special` flag is false."""
        ids = list(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special]
        try:
            data = self._enc.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            raise self._unknown_id(next(i for i in ids if not self._in_vocab(i))) from None
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (a special token's bytes are its name)."""
        try:
            return self._enc.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError, TypeError):
            raise self._unknown_id(token_id) from None

    def _in_vocab(self, token_id) -> bool:
        try:
            return 0 <= operator.index(token_id) < self.n_vocab
        except TypeError:
            return False

    def _unknown_id(self, token_id) -> KimiError:
        return KimiError(f"token id {token_id!r} is outside the vocabulary (0..{self.n_vocab - 1})")

    def token_id(self, text: str) -> int:
        """Id of a special token by name, or of the regular token whose bytes are `text`."""
        if text in self._ids:
            return self._ids[text]
        rank = self._ranks.get(text.encode("utf-8"))
        if rank is None:
            raise KimiError(f"{text!r} is not a single token of this vocabulary")
        return rank

    def id_to_token(self, token_id: int) -> str:
        """Name of a special token, or the text of a regular one (U+FFFD where its bytes are a
        partial UTF-8 character)."""
        if token_id in self._names:
            return self._names[token_id]
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    @property
    def special_tokens(self) -> dict[str, int]:
        """All 256 special slots, name -> id."""
        return dict(self._ids)


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text as soon as it is complete.

    A character whose UTF-8 bytes span several tokens is held back until its last byte arrives,
    so no U+FFFD appears for valid text; joined output equals `Tokenizer.decode` of all ids.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self._skip_special and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back; bytes that never completed a character become U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _read_ranks(vocab_file: Path) -> dict[bytes, int]:
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function caches
    # local files by path under /tmp: an edited vocabulary at the same path would be read stale.
    try:
        data = vocab_file.read_bytes()
    except FileNotFoundError:
        raise KimiError(f"{vocab_file}: tokenizer vocabulary not found") from None
    except OSError as e:
        raise KimiError(f"{vocab_file}: cannot read tokenizer vocabulary ({e})") from None
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise KimiError(f"{vocab_file}: line {lineno} is not '<base64 token> <rank>'") from None
    if not ranks:
        raise KimiError(f"{vocab_file}: empty tokenizer vocabulary")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise KimiError(f"{vocab_file}: ranks must be 0..{len(ranks) - 1}, each used once")
    return ranks


def _special_slots(config: dict, num_base: int, source: str) -> dict[int, tuple[str, bool]]:
    """Slot id -> (name, special flag) for the named special tokens."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        # A config without the table gets K2's published layout rather than 256 anonymous slots.
        return {num_base + t.k2_id - K2_NUM_BASE_TOKENS: (t.name, t.special) for t in K2_SPECIAL_TOKENS}
    if not isinstance(decoder, dict):
        raise KimiError(f"{source}: added_tokens_decoder must be an object")
    slots = {}
    for key, entry in decoder.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise KimiError(f"{source}: added_tokens_decoder[{key!r}] needs a string 'content'")
        try:
            token_id = int(key)
        except ValueError:
            raise KimiError(f"{source}: added_tokens_decoder key {key!r} is not a token id") from None
        # Like K2's loader, entries outside the special range are not consulted.
        if num_base <= token_id < num_base + NUM_SPECIAL_SLOTS:
            slots[token_id] = (entry["content"], bool(entry.get("special", True)))
    return slots


def _token_name(value, default: str, source: str) -> str:
    """bos_token / eos_token may be a string, an AddedToken-style object, or absent."""
    if value is None:
        return default
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise KimiError(f"{source}: bos_token/eos_token must be a token string")
    return value


def write_tokenizer_files(
    directory: str | Path, mergeable_ranks: dict[bytes, int], *, extra_config: dict | None = None
) -> Path:
    """Write `tiktoken.model` and a K2-layout `tokenizer_config.json` (no chat template: that is
    its own file). The named specials land at num_base + (k2_id - 163584)."""
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
        raise KimiError(f"mergeable ranks must be 0..{n - 1}, each used once")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_rank = sorted(mergeable_ranks.items(), key=lambda item: item[1])
    lines = "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank)
    (directory / VOCAB_FILE).write_text(lines, encoding="ascii")
    added = {
        str(n + t.k2_id - K2_NUM_BASE_TOKENS): {
            "content": t.name, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": t.special,
        }
        for t in K2_SPECIAL_TOKENS
    }
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": list(ADDITIONAL_SPECIAL_TOKENS),
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 262144,
        "tokenizer_class": "TikTokenTokenizer",
        **(extra_config or {}),
    }
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
    return directory
