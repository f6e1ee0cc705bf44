"""Train the nano model's byte-level BPE and write it in K2's tokenizer format.

The BPE is trained with Hugging Face `tokenizers` on the text of the agent training conversations
(message text, reasoning, tool arguments and results, tool declarations — the chat markers are
special tokens and are never merged), then written as `tiktoken.model` (base64 token bytes and
rank per line) plus `tokenizer_config.json` with K2's 256 special slots after the ranks, exactly the
layout the runtime reads for the real model.

Training splits text with K2's own pre-tokenizer pattern (the runtime's `PAT_STR`), so merges are
learned on the pieces the runtime will cut. Digits are never merged: every number is a sequence of
single-digit tokens. K2 itself merges up to three digits, but a few-million-parameter model copies
"4821" far more reliably as four tokens from a ten-token alphabet it sees constantly than as
"482" + "1" drawn from a thousand number tokens, each rare.

    python scripts/build_tokenizer.py --data out/agent_data --out out/nano_tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def gpt2_byte_alphabet() -> dict[str, int]:
    """Printable stand-in character -> byte, as the byte-level pre-tokenizer spells bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def corpus(data_dir: str):
    """Plain text pieces of every training conversation, chat markers removed."""
    from kimi_jax.chat import ChatTemplate
    from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS

    template = ChatTemplate.default()
    marker = re.compile("|".join(re.escape(t.name) for t in K2_SPECIAL_TOKENS))
    with open(os.path.join(data_dir, "train.jsonl"), encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            text = template.render(item["messages"][:-1], item.get("tools"), add_generation_prompt=True)
            final = item["messages"][-1]
            text += (final.get("reasoning_content") or "") + " " + (final.get("content") or "")
            yield from (piece for piece in marker.split(text) if piece)


def train_ranks(texts, n_ranks: int) -> dict[bytes, int]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from kimi_jax.chat.tokenizer import PAT_STR

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), "isolated"), pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_ranks, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    alphabet = gpt2_byte_alphabet()
    vocab = tok.get_vocab()
    ranks = {}
    # Single bytes first (ranks 0..255 in byte order), then merged tokens in the trainer's merge
    # order — lower rank merges first, which is what makes the rank table a valid BPE.
    for b in range(256):
        ranks[bytes([b])] = b
    for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
        data = bytes(alphabet[c] for c in token)
        if len(data) > 1 and data not in ranks and not any(chr(b).isdigit() for b in data):
            ranks[data] = len(ranks)
    return ranks


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/agent_data", help="directory with train.jsonl")
    ap.add_argument("--out", default="out/nano_tokenizer")
    ap.add_argument("--ranks", type=int, default=3840, help="regular tokens (special slots come on top)")
    args = ap.parse_args(argv)
    from kimi_jax.chat import Tokenizer, write_tokenizer_files

    if not os.path.isfile(os.path.join(args.data, "train.jsonl")):
        print(f"error: {args.data}/train.jsonl not found (run scripts/make_agent_data.py first)", file=sys.stderr)
        return 2
    ranks = train_ranks(corpus(args.data), args.ranks)
    os.makedirs(args.out, exist_ok=True)
    write_tokenizer_files(args.out, ranks)
    tok = Tokenizer.from_dir(args.out)
    sample = "The user wants 17*23. I will use the calculator. 391"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode("4821")) == 4, "digits must stay single tokens"
    print(f"wrote {args.out}: {len(ranks)} ranks + 256 special slots = vocab {tok.n_vocab}; "
          f"'{sample}' -> {len(tok.encode(sample))} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
