"""Tokenizer: vocabulary layout, encode/decode round trips, streaming decode, file errors."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimi_jax.chat import Tokenizer, byte_level_ranks, write_tokenizer_files
from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS, _split_long_runs
from kimi_jax.errors import KimiError

# Merges on top of the 256 byte tokens. Each word adds its prefixes as a chain so BPE can reach it;
# "世" (e4 b8 96) and "界" (e7 95 8c) get merges that end or start in the middle of a character.
_WORDS = [b"hello", b" world", b" the", b"1234", b"aa", b"o ", b"\xe4\xb8", b"\x96\xe7"]


def _fixture_ranks() -> dict[bytes, int]:
    ranks = byte_level_ranks()
    for word in _WORDS:
        for end in range(2, len(word) + 1):
            ranks.setdefault(word[:end], len(ranks))
    return ranks


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer_files(tmp_path_factory.mktemp("tok"), _fixture_ranks())


@pytest.fixture(scope="module")
def tok(tok_dir):
    return Tokenizer.from_dir(tok_dir)


def test_special_tokens_sit_right_after_the_regular_ranks(tok):
    base = len(_fixture_ranks())
    assert tok.num_base_tokens == base
    assert tok.n_vocab == base + 256
    assert tok.bos_id == tok.token_id("[BOS]") == base
    assert tok.eos_id == base + 1
    assert tok.im_end_id == base + 2
    assert tok.token_id("<|im_system|>") == base + 10
    assert tok.token_id("<|tool_calls_section_begin|>") == base + 11
    assert tok.token_id("<|im_middle|>") == base + 17
    assert (tok.think_start_id, tok.think_end_id) == (base + 22, base + 23)
    assert tok.token_id("[PAD]") == base + 255
    assert tok.id_to_token(base + 5) == f"<|reserved_token_{base + 5}|>"
    assert len(tok.special_tokens) == 256


def test_stop_ids_are_im_end_then_eos(tok):
    assert tok.stop_ids == (tok.im_end_id, tok.eos_id)


def test_real_k2_sizes_put_named_specials_at_k2_ids(tmp_path):
    ranks = byte_level_ranks()
    ranks.update({b"\x00%d" % i: 256 + i for i in range(163584 - 256)})
    tok = Tokenizer.from_dir(write_tokenizer_files(tmp_path, ranks))
    assert (tok.num_base_tokens, tok.n_vocab) == (163584, 163840)
    for t in K2_SPECIAL_TOKENS:
        assert tok.token_id(t.name) == t.k2_id
        assert tok.is_special(t.k2_id) == t.special
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (163584, 163585, 163586)
    assert (tok.think_start_id, tok.think_end_id) == (163606, 163607)
    assert tok.id_to_token(163589) == "<|reserved_token_163589|>"


@pytest.mark.parametrize(
    "text",
    ["hello world, the end.", "世界你好，世界", "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
     "mixed Ωmega 世界 1234567 \n\n\t x", ""],
)
def test_encode_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_merges_apply_within_pre_tokenizer_pieces(tok):
    assert tok.encode("hello") == [tok.token_id("hello")]
    # K2's regex splits "hello world" before " world" and digits in groups of three, so the
    # merges "o " and "1234" must never be used.
    assert tok.encode("hello world") == [tok.token_id("hello"), tok.token_id(" world")]
    assert tok.token_id("1234") not in tok.encode("1234")
    assert tok.encode("1234") == [tok.token_id("123"), tok.token_id("4")]


def test_special_strings_in_text_stay_plain_text_unless_allowed(tok):
    text = "a<|im_end|>b[EOS]"
    plain = tok.encode(text)
    assert tok.im_end_id not in plain and tok.eos_id not in plain
    assert all(i < tok.num_base_tokens for i in plain)
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert allowed == [ord("a"), tok.im_end_id, ord("b"), tok.eos_id]


def test_decode_skip_special_keeps_tool_markers_and_think_tags(tok):
    kept = "<think>r</think><|tool_calls_section_begin|>x<|tool_calls_section_end|>"
    ids = tok.encode(kept + "<|im_end|>[EOS]", allow_special=True)
    assert tok.decode(ids, skip_special=True) == kept
    assert tok.decode(ids).endswith("<|im_end|>[EOS]")


def test_decode_rejects_ids_outside_vocabulary(tok):
    with pytest.raises(KimiError, match="outside the vocabulary"):
        tok.decode([1, tok.n_vocab])
    with pytest.raises(KimiError, match="outside the vocabulary"):
        tok.id_to_token(-1)


def test_token_id_of_unknown_text_raises(tok):
    with pytest.raises(KimiError, match="not a single token"):
        tok.token_id("<|no_such_token|>")


def test_encode_survives_huge_runs(tok):
    text = "a" * 60_001 + " " * 30_000 + "世" * 410_000
    assert tok.decode(tok.encode(text)) == text


def test_long_runs_are_cut_every_25000_chars():
    text = "x" + " " * 60_000 + "yz"
    pieces = list(_split_long_runs(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [25_001, 25_000, 10_002]


@pytest.mark.parametrize("text", ["世界", "a世界b", "😀 👍🏽 ok", "Ωmega 世界 😀"])
def test_stream_decoder_holds_back_partial_characters(tok, text):
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == text


def test_stream_decoder_emits_a_character_when_its_last_byte_arrives(tok):
    world = tok._ranks[b"\x96\xe7"]  # ends 世 and starts 界
    stream = tok.stream_decoder()
    assert stream.add(tok._ranks[b"\xe4\xb8"]) == ""
    assert stream.add(world) == "世"
    assert stream.add(0x95) == ""
    assert stream.add(0x8C) == "界"


def test_stream_decoder_flush_replaces_an_unfinished_character(tok):
    stream = tok.stream_decoder()
    assert stream.add(0xE4) == ""
    assert stream.flush() == "\ufffd"


def test_stream_decoder_special_tokens_decode_to_their_names(tok):
    stream = tok.stream_decoder()
    assert stream.add(tok.im_end_id) == "<|im_end|>"
    skipping = tok.stream_decoder(skip_special=True)
    assert skipping.add(tok.im_end_id) == ""
    assert skipping.add(tok.token_id("<|tool_call_end|>")) == "<|tool_call_end|>"


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 555), max_size=40))
def test_stream_decoder_joined_equals_decode(tok, ids):
    ids = [i % tok.n_vocab for i in ids]
    stream = tok.stream_decoder()
    assert "".join(stream.add(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_written_config_has_k2_layout(tok_dir):
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    base = len(_fixture_ranks())
    assert config["tokenizer_class"] == "TikTokenTokenizer"
    assert (config["bos_token"], config["eos_token"]) == ("[BOS]", "[EOS]")
    assert "<|im_middle|>" in config["additional_special_tokens"]
    assert "chat_template" not in config
    assert config["added_tokens_decoder"][str(base + 13)] == {
        "content": "<|tool_call_begin|>", "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": False,
    }


def test_extra_config_overrides_written_fields(tmp_path):
    write_tokenizer_files(tmp_path, byte_level_ranks(), extra_config={"model_max_length": 4096})
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 4096


def test_config_without_added_tokens_decoder_gets_k2_layout(tmp_path):
    write_tokenizer_files(tmp_path, byte_level_ranks())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.im_end_id == 258 and not tok.is_special(tok.token_id("<|tool_call_begin|>"))


def _break(tmp_path, file, text):
    write_tokenizer_files(tmp_path, byte_level_ranks())
    if text is None:
        (tmp_path / file).unlink()
    else:
        (tmp_path / file).write_text(text)


@pytest.mark.parametrize(
    "file, text, message",
    [
        ("tiktoken.model", None, "tiktoken.model: tokenizer vocabulary not found"),
        ("tiktoken.model", "QQ== 0\nnot-base64!! 1\n", "tiktoken.model: line 2"),
        ("tiktoken.model", "QQ== 0\nQg== 5\n", "tiktoken.model: ranks must be 0..1"),
        ("tokenizer_config.json", None, "tokenizer_config.json: tokenizer config not found"),
        ("tokenizer_config.json", "{not json", "tokenizer_config.json: cannot read"),
        ("tokenizer_config.json", "[]", "tokenizer_config.json: expected a JSON object"),
        ("tokenizer_config.json", '{"added_tokens_decoder": {}}', "tokenizer_config.json: special token"),
        ("tokenizer_config.json", '{"added_tokens_decoder": {"256": {"special": true}}}',
         r"tokenizer_config.json: added_tokens_decoder\['256'\]"),
    ],
)
def test_bad_tokenizer_files_raise_kimi_error_naming_the_file(tmp_path, file, text, message):
    _break(tmp_path, file, text)
    with pytest.raises(KimiError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_chat_package_imports_without_jax():
    code = "import sys, kimi_jax.chat; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
