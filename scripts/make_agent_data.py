"""Deterministic synthetic agentic conversations for training and evaluating kimi-k2-nano.

    python scripts/make_agent_data.py --out out/agent_data --seed 0

Writes six JSON-lines files; each line is one conversation `{"id", "family", "tools", "messages",
"answer"}`: OpenAI-style messages where the assistant thinks (`reasoning_content`), calls builtin
tools (ids `functions.NAME:IDX`, IDX a conversation-global counter from 0), reads the results —
produced by really running the tools through `ToolRegistry.call` — and answers. `answer` is a
substring the final answer must contain.

  train.jsonl       every family of scripts/nano_tasks.py, training wordings, no held-out value
  heldout.jsonl     single-tool, no-tool and recovery families with held-out values (unseen numbers,
                    dates, keys, names, unit pairs, key/fact combinations), training wordings
  multistep.jsonl   the two- and three-call families with held-out values
  followup.jsonl    two-turn conversations whose second turn works on the first answer ("Now add
                    50 to that."), with held-out values
  paraphrase.jsonl  single-tool and multi-step tasks worded by scripts/nano_eval_phrasings.py,
                    whose templates training never sees
  ood.jsonl         questions no tool answers and greetings (nano_eval_phrasings.OUT_OF_DOMAIN): the
                    reply must come without a tool call

Split rule: every value a conversation draws is a "slot", and a slot value is held out when
crc32("KIND:VALUE") % 100 < HOLD_PCT[KIND]. Training conversations contain no held-out value; the
held-out, multi-step and follow-up sets contain at least one, and no evaluation prompt equals a
training one; nor does any training question equal an out-of-domain or everyday evaluation prompt
(nano_eval_phrasings). Evaluation conversations declare all builtin tools, as `--tools builtin`
does; training ones declare all of them ALL_TOOLS_SHARE of the time, otherwise the tools they use
plus up to two distractors.
current_time reads a clock derived from the item id (`clock_for`), so re-running a conversation's
calls reproduces its results exactly.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import time
import zlib

import nano_chains
import nano_eval_phrasings
import nano_no_tool
import nano_tasks
from nano_tasks import Reject

from kimi_jax.tools import KVStore, ToolRegistry, builtin_tools

HOLD_PCT = {"n": 10, "date": 10, "pair": 15, "country": 20, "element": 20, "planet": 25, "fact": 15, "tz": 20,
            "kv_key": 20, "kv_value": 15, "phrase": 20, "word": 15}
EPOCH = dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc)
SPECS = {spec["function"]["name"]: spec for spec in builtin_tools().specs()}
# The families and their shares of the training set: name -> (generator, weight).
SINGLE = {"calculator": (nano_tasks.calculator, 3.0), "convert": (nano_tasks.convert, 2.0),
          "lookup": (nano_tasks.lookup, 2.0), "date": (nano_tasks.date, 2.0), "memory": (nano_tasks.memory, 1.5)}
NO_TOOL = {"chat": (nano_no_tool.chat, 1.2), "out_of_scope": (nano_no_tool.out_of_scope, 1.6)}
RECOVERY = {"recovery": (nano_tasks.recovery, 0.8), "wrong_key": (nano_tasks.wrong_key, 0.4)}
MULTI_STEP = {"lookup_calc": (nano_chains.lookup_calc, 1.0), "three_step": (nano_chains.three_step, 0.7),
              "convert_calc": (nano_chains.convert_calc, 1.2), "date_chain": (nano_chains.date_chain, 0.7),
              "calc_chain": (nano_chains.calc_chain, 0.7), "memory_calc": (nano_chains.memory_calc, 0.6)}
FOLLOW_UP = {"follow_up": (nano_chains.follow_up, 1.8)}
FAMILIES = {**SINGLE, **NO_TOOL, **RECOVERY, **MULTI_STEP, **FOLLOW_UP}
ALL_TOOLS_SHARE = 0.7  # training conversations that declare all nine tools, as the CLI's --tools builtin
EVAL_SETS = {  # file: (families, phrasing table, whether an item must hold a held-out value)
    "heldout": ({**SINGLE, **NO_TOOL, **RECOVERY}, nano_tasks.ASK, True),
    "multistep": (MULTI_STEP, nano_tasks.ASK, True),
    "paraphrase": ({**SINGLE, **MULTI_STEP, **FOLLOW_UP}, nano_eval_phrasings.PARAPHRASE_ASK, False),
    "followup": (FOLLOW_UP, nano_tasks.ASK, True),
}
DEFAULT_SIZES = {"train": 60000, "heldout": 144, "multistep": 96, "paraphrase": 110, "ood": 36, "followup": 60}
# Questions training must never ask: the evaluation's own out-of-domain questions and everyday prompts.
UNSEEN = {q for q, _ in nano_eval_phrasings.OUT_OF_DOMAIN} | {t for turns, _, _ in nano_eval_phrasings.EVERYDAY
                                                               for t in turns}


def held_out(kind: str, value) -> bool:
    return zlib.crc32(f"{kind}:{value}".encode()) % 100 < HOLD_PCT[kind]


def clock_for(item_id: str):
    """A fixed clock per conversation: deterministic, yet different times across conversations."""
    moment = EPOCH + dt.timedelta(seconds=zlib.crc32(item_id.encode()) % (20 * 365 * 86400))
    return lambda: moment


def registry_for(item_id: str) -> ToolRegistry:
    """The tools exactly as one conversation saw them: its own clock and an empty store."""
    return builtin_tools(clock=clock_for(item_id), store=KVStore())


class _Tools:
    """One registry for the whole run (building one parses nine signatures, which would dominate the
    run time); each conversation gets the clock and empty store that `registry_for` would give it."""

    def __init__(self):
        self.store = KVStore()
        self.now = EPOCH
        self.registry = builtin_tools(clock=lambda: self.now, store=self.store)

    def reset(self, item_id: str) -> ToolRegistry:
        self.now = clock_for(item_id)()
        self.store.clear()
        return self.registry


_TOOLS = _Tools()


class Convo:
    """One conversation being drawn: random values (through the split rule), messages, tool runs."""

    def __init__(self, item_id: str, rng: random.Random, split: str, phrasing: dict):
        self.rng, self.split, self.phrasing = rng, split, phrasing
        self.tools = _TOOLS.reset(item_id)
        self.messages: list[dict] = []
        self.used: list[str] = []
        self.calls = 0
        self.any_held = False

    # ---- slots: every drawn value goes through here so the split rule sees it
    def slot(self, kind: str, value):
        if held_out(kind, value):
            if self.split == "train":
                raise Reject
            self.any_held = True
        return value

    def pick(self, kind: str, options):
        return self.slot(kind, self.rng.choice(options))

    def integer(self, digits: int) -> int:
        """A random integer with exactly `digits` digits (0-9 for one digit)."""
        return self.slot("n", self.rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1))

    def between(self, lo: int, hi: int) -> int:
        return self.slot("n", self.rng.randint(lo, hi))

    def decimal(self) -> str:
        """'0.5', '37.25', '1204.125': up to 4 integer digits, 1-3 decimals, no trailing zero."""
        whole = self.rng.choice((0, self.rng.randint(1, 9), self.rng.randint(10, 99), self.rng.randint(100, 9999)))
        places = self.rng.choice((1, 1, 2, 3))
        frac = f"{self.rng.randint(0, 10 ** (places - 1) - 1):0{places - 1}d}" if places > 1 else ""
        return self.slot("n", f"{whole}.{frac}{self.rng.randint(1, 9)}")

    def word(self) -> str:
        return self.slot("word", nano_tasks.pseudo_word(self.rng))

    def date(self) -> str:
        day = dt.date(1995, 1, 1) + dt.timedelta(days=self.rng.randrange(41 * 365))
        return self.slot("date", day.isoformat())

    # ---- messages
    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def ask(self, key: str, **fields) -> None:
        """A user message in one of this conversation's wordings for `key`."""
        self.user(self.rng.choice(self.phrasing[key]).format(**fields))

    def call(self, reasoning: str, name: str, *, error: bool = False, **args):
        """Run a tool call as the assistant's next step; returns the parsed result (the error text
        when `error`, which says the tool is expected to reject this call)."""
        call_id = f"functions.{name}:{self.calls}"
        self.calls += 1
        arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        result = self.tools.call(name, arguments)
        if result.is_error != error:
            raise RuntimeError(f"generator bug: {name}({arguments}) -> {result.content}")
        self.messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning,
                              "tool_calls": [{"id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": arguments}}]})
        self.messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": result.content})
        if name not in self.used:
            self.used.append(name)
        return result.content if error else json.loads(result.content)

    def reply(self, reasoning: str, content: str) -> None:
        self.messages.append({"role": "assistant", "reasoning_content": reasoning, "content": content})


# ---- generation ----------------------------------------------------------------------------------

def user_text(item: dict) -> tuple[str, ...]:
    return tuple(m["content"] for m in item["messages"] if m["role"] == "user")


def declared_tools(used: list[str], rng: random.Random, split: str) -> list[dict]:
    """All builtin tools (what `--tools builtin` declares), or in training some of the time only the
    used ones plus up to two distractors, so the model learns to choose by name from either."""
    if split != "train" or rng.random() < ALL_TOOLS_SHARE:
        return list(SPECS.values())
    names = list(used)
    for _ in range(rng.choice((0, 1, 1, 2))):
        names.insert(rng.randint(0, len(names)), rng.choice([n for n in SPECS if n not in names]))
    return [SPECS[n] for n in names]


def make_item(fill, family: str, item_id: str, rng: random.Random, split: str, phrasing: dict,
              need_held: bool = False, max_tries: int = 10_000) -> dict:
    for _ in range(max_tries):
        c = Convo(item_id, rng, split, phrasing)
        try:
            answer = fill(c)
        except Reject:
            continue
        if need_held and not c.any_held:
            continue
        if split == "train" and any(m["content"] in UNSEEN for m in c.messages if m["role"] == "user"):
            continue
        return {"id": item_id, "family": family, "tools": declared_tools(c.used, rng, split), "messages": c.messages,
                "answer": answer}
    raise RuntimeError(f"no {split} item for {family} after {max_tries} tries")


def make_train(seed: int, n: int) -> list[dict]:
    rng = random.Random(f"kimi-agent-data/{seed}/train")
    families = list(FAMILIES)
    weights = [w for _, w in FAMILIES.values()]
    out = []
    for i in range(n):
        family = rng.choices(families, weights)[0]
        out.append(make_item(FAMILIES[family][0], family, f"train-{i:05d}", rng, "train", nano_tasks.ASK))
    return out


def make_eval_set(name: str, seed: int, n: int, seen: set) -> list[dict]:
    """`n` items spread evenly over the set's families, none with a prompt in `seen` (which grows)."""
    families, phrasing, need_held = EVAL_SETS[name]
    rng = random.Random(f"kimi-agent-data/{seed}/{name}")
    items: list[dict] = []
    for f, (family, (fill, _)) in enumerate(families.items()):
        want = n // len(families) + (f < n % len(families))
        for _ in range(100 * (want + 1)):
            if not want:
                break
            item = make_item(fill, family, f"{name}-{len(items):04d}", rng, "eval", phrasing, need_held)
            if user_text(item) not in seen:
                seen.add(user_text(item))
                items.append(item)
                want -= 1
        if want:
            raise RuntimeError(f"too few distinct {name} prompts for {family}; ask for fewer")
    return items


def make_ood_set(n: int) -> list[dict]:
    """The out-of-domain questions with the reply a good model gives (reasoning, then no tool)."""
    questions = nano_eval_phrasings.OUT_OF_DOMAIN
    if n > len(questions):
        raise ValueError(f"--n-ood {n}: only {len(questions)} out-of-domain questions exist")
    replies = {"can't": nano_no_tool.CANNOT, "Kimi": nano_no_tool.IDENTITY, "calculate": nano_no_tool.ABILITIES,
               "Hello": "Hello! How can I help you today?", "welcome": "You're welcome!",
               "Goodbye": "Goodbye! Have a nice day."}
    return [{"id": f"ood-{i:04d}", "family": "out_of_domain", "tools": list(SPECS.values()),
             "messages": [{"role": "user", "content": q},
                          {"role": "assistant", "reasoning_content": "No tool is needed.", "content": replies[a]}],
             "answer": a} for i, (q, a) in enumerate(questions[:n])]


def generate(seed: int = 0, sizes: dict | None = None) -> dict[str, list[dict]]:
    """{"train": [...], "heldout": [...], "multistep": [...], "paraphrase": [...], "followup": [...],
    "ood": [...]}."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out = {"train": make_train(seed, sizes["train"])}
    seen = {user_text(item) for item in out["train"]}
    for name in EVAL_SETS:
        out[name] = make_eval_set(name, seed, sizes[name], seen)
    out["ood"] = make_ood_set(sizes["ood"])
    return out


def write_jsonl(path: str, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/agent_data")
    ap.add_argument("--seed", type=int, default=0)
    for name, n in DEFAULT_SIZES.items():
        ap.add_argument(f"--n-{name}", type=int, default=n, help=f"conversations in {name}.jsonl (default {n})")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    sets = generate(args.seed, {name: getattr(args, f"n_{name}") for name in DEFAULT_SIZES})
    os.makedirs(args.out, exist_ok=True)
    for name, items in sets.items():
        write_jsonl(os.path.join(args.out, f"{name}.jsonl"), items)
    counts = ", ".join(f"{name} {len(items)}" for name, items in sets.items())
    print(f"wrote {counts} conversations to {args.out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
