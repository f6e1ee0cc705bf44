"""Deterministic synthetic agentic conversations for training kimi-k2-nano.

    python scripts/make_agent_data.py --out out/agent_data --seed 0 --n-train 20000 --n-eval 200

Writes train.jsonl and eval.jsonl; each line is one conversation
`{"id", "family", "tools", "messages", "answer"}`: OpenAI-style messages where the assistant thinks
(`reasoning_content`), calls a builtin tool (ids `functions.NAME:IDX`, IDX a conversation-global
counter from 0), reads the result — produced by really running the tool through
`ToolRegistry.call` — and answers. `answer` is a substring the final answer must contain.
Reasoning is short and regular, tool arguments are copied from the user text and the answer copies
the tool result, so a few-million-parameter model can learn the whole loop. Each conversation
declares only the tools it uses; single-tool and chat conversations sometimes one more (a distractor).

Families:
  calculator    arithmetic: + - * / // % **, parentheses, decimals
  convert       unit conversion (length, mass, volume, time, temperature)
  lookup        one fact from the countries / elements / planets tables
  date          date_add forwards and backwards, date_diff, current_time in a timezone
  lookup_calc   lookup then calculator (grams of n moles, protons in n atoms, planet diameters)
  convert_calc  convert then multiply, or add then convert
  memory        kv_set then kv_get / kv_list, within one turn or across two user turns
  chat          greetings, thanks, questions about the assistant: answered without a tool

Split rule: every value a conversation draws (each number, date, table key, unit pair, key/fact
combination, UTC offset, memory key and value, chat phrasing and name) is a "slot", and a slot value
is held out when crc32("KIND:VALUE") % 100 < HOLD_PCT[KIND]. Train conversations contain no held-out
value; eval conversations contain at least one. Eval therefore tests unseen numbers, dates, keys,
unit pairs and key/fact combinations, never a prompt seen in training (eval items whose user text
still matches a train item are dropped, and eval prompts are distinct). Eval is spread evenly over
the families. current_time reads a clock derived from the item id (`clock_for`), so re-running a
conversation's calls reproduces its results exactly.
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

from kimi_jax.tools import TABLES, KVStore, ToolRegistry, builtin_tools

HOLD_PCT = {"n": 10, "date": 10, "pair": 15, "country": 20, "element": 20, "planet": 25, "fact": 15, "tz": 25,
            "kv_key": 20, "kv_value": 15, "phrase": 20, "name": 15}
EPOCH = dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc)
SPECS = {spec["function"]["name"]: spec for spec in builtin_tools().specs()}


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


class Reject(Exception):
    """The drawn values belong to the other split; draw again."""


def show(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


class Convo:
    def __init__(self, item_id: str, rng: random.Random, split: str):
        self.rng, self.split = rng, split
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

    def num(self, lo: int = 1, hi: int | None = None) -> int:
        """A number with 1-4 digits (short ones more often), or uniform in [lo, hi]."""
        if hi is None:
            digits = self.rng.choice((1, 2, 2, 3, 3, 3, 4))
            lo, hi = max(lo, 10 ** (digits - 1)), 10 ** digits - 1
        return self.slot("n", self.rng.randint(lo, hi))

    def value(self) -> int | float:
        """A measurement: an integer, or one decimal place a quarter of the time."""
        if self.rng.random() < 0.25:
            return float(self.slot("n", f"{self.rng.randint(0, 99)}.{self.rng.randint(1, 9)}"))
        return self.num(1, 999)

    def date(self) -> str:
        day = dt.date(1995, 1, 1) + dt.timedelta(days=self.rng.randrange(41 * 365))
        return self.slot("date", day.isoformat())

    # ---- messages
    def user(self, text: str) -> None:
        self.messages.append({"role": "user", "content": text})

    def call(self, reasoning: str, name: str, **args):
        call_id = f"functions.{name}:{self.calls}"
        self.calls += 1
        arguments = json.dumps(args, ensure_ascii=False, separators=(",", ":"))
        result = self.tools.call(name, arguments)
        if result.is_error:
            raise RuntimeError(f"generator bug: {name}({arguments}) -> {result.content}")
        self.messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning,
                              "tool_calls": [{"id": call_id, "type": "function",
                                              "function": {"name": name, "arguments": arguments}}]})
        self.messages.append({"role": "tool", "tool_call_id": call_id, "name": name,
                              "content": result.content})
        if name not in self.used:
            self.used.append(name)
        out = json.loads(result.content)
        return out if name == "lookup" else out["result"]

    def reply(self, reasoning: str, content: str) -> None:
        self.messages.append({"role": "assistant", "reasoning_content": reasoning, "content": content})


# ---- families: each fills a Convo and returns the substring the final answer must contain -------

CALC_ASK = ("What is {e}?", "Calculate {e}.", "Compute {e}.", "What's {e}?", "Work out {e}.",
            "How much is {e}?", "Evaluate {e}.", "Please calculate {e}.")
CALC_SAY = ("{e} = {r}.", "The answer is {r}.", "{e} is {r}.")


def calculator(c: Convo) -> str:
    rng = c.rng
    shape = rng.randrange(6)
    if shape == 0:
        e = f"{c.num()} {rng.choice('+-*')} {c.num()}"
    elif shape == 1:  # exact division, so answers stay short
        b, q = c.num(2, 99), c.num(1, 999)
        e = f"{b * q} / {b}"
    elif shape == 2:
        a, b, d = c.num(1, 99), c.num(1, 99), c.num(1, 99)
        e = rng.choice((f"({a} + {b}) * {d}", f"{a} * {b} + {d}", f"{a} - {b} * {d}", f"({a} - {b}) * {d}"))
    elif shape == 3:
        e = f"{c.num(10, 9999)} {rng.choice(('//', '%'))} {c.num(2, 99)}"
    elif shape == 4:
        e = f"{c.num(2, 40)} ** {rng.choice((2, 2, 3))}"
    else:
        e = f"{c.value()} {rng.choice('+-*')} {c.num(1, 99)}"
    if rng.random() < 0.4:
        e = e.replace(" ", "")
    c.user(rng.choice(CALC_ASK).format(e=e))
    r = show(c.call(f"The user wants {e}. I will use the calculator.", "calculator", expression=e))
    c.reply(f"The result is {r}.", rng.choice(CALC_SAY).format(e=e, r=r))
    return r


CONVERT_UNITS = {"length": ("m", "km", "cm", "mm", "mi", "yd", "ft", "in"),
                 "mass": ("kg", "g", "lb", "oz", "t"), "volume": ("l", "ml", "gal", "cup"),
                 "time": ("s", "min", "h", "day", "week"), "temperature": ("C", "F", "K")}
UNIT_WORDS = {"m": "meters", "km": "kilometers", "cm": "centimeters", "mm": "millimeters", "mi": "miles",
              "yd": "yards", "ft": "feet", "in": "inches", "kg": "kilograms", "g": "grams", "lb": "pounds",
              "oz": "ounces", "t": "tonnes", "l": "liters", "ml": "milliliters", "gal": "gallons",
              "cup": "cups", "s": "seconds", "min": "minutes", "h": "hours", "day": "days", "week": "weeks",
              "C": "celsius", "F": "fahrenheit", "K": "kelvin"}
CONVERT_ASK = ("Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?",
               "{v} {a} in {b}, please.", "Please convert {v} {a} into {b}.")


def units(c: Convo, dims=tuple(CONVERT_UNITS)) -> tuple[str, str]:
    """A unit pair as the user writes it (abbreviations or words; the tool accepts both)."""
    a, b = c.rng.sample(CONVERT_UNITS[c.rng.choice(dims)], 2)
    c.slot("pair", f"{a}>{b}")
    return (UNIT_WORDS[a], UNIT_WORDS[b]) if c.rng.random() < 0.5 else (a, b)


def convert(c: Convo) -> str:
    a, b = units(c)
    v = c.value()
    c.user(c.rng.choice(CONVERT_ASK).format(v=v, a=a, b=b))
    r = show(c.call(f"I will convert {v} {a} to {b} with convert_units.", "convert_units",
                    value=v, from_unit=a, to_unit=b))
    c.reply(f"The result is {r} {b}.", f"{v} {a} is {r} {b}.")
    return r


FACTS = (  # table, field, label, questions, answer
    ("countries", "capital", "capital", ("What is the capital of {k}?", "Which city is the capital of {k}?",
                                         "Name the capital of {k}."), "The capital of {k} is {v}."),
    ("countries", "continent", "continent", ("Which continent is {k} in?", "On which continent is {k}?"),
     "{k} is in {v}."),
    ("countries", "currency", "currency",
     ("What currency does {k} use?", "What is the currency code of {k}?"), "{k} uses {v}."),
    ("elements", "number", "atomic number",
     ("What is the atomic number of {k}?", "Give me the atomic number of {k}."),
     "The atomic number of {k} is {v}."),
    ("elements", "mass", "atomic mass",
     ("What is the atomic mass of {k}?", "How heavy is one atom of {k} in u?"),
     "The atomic mass of {k} is {v}."),
    ("elements", "symbol", "symbol",
     ("What is the chemical symbol for {k}?", "What is the symbol of {k}?"), "The symbol for {k} is {v}."),
    ("planets", "order", "position",
     ("Which planet from the Sun is {k}?", "What is the position of {k} from the Sun?"),
     "{k} is planet number {v} from the Sun."),
    ("planets", "radius_km", "radius", ("What is the radius of {k}?", "How big is {k}? Give the radius."),
     "The radius of {k} is {v} km."),
)
KEY_KIND = {"countries": "country", "elements": "element", "planets": "planet"}


def lookup(c: Convo) -> str:
    table, field, label, asks, say = c.rng.choice(FACTS)
    k = c.pick(KEY_KIND[table], list(TABLES[table]))
    c.slot("fact", f"{k}/{field}")
    c.user(c.rng.choice(asks).format(k=k))
    v = show(c.call(f"I will look up {k} in {table}.", "lookup",
                    table=table, key=k)[field])
    c.reply(f"The {label} of {k} is {v}.", say.format(k=k, v=v))
    return v


TIMEZONES = ("UTC", "+01:00", "+02:00", "+03:00", "+03:30", "+04:00", "+05:30", "+05:45", "+07:00", "+08:00",
             "+09:00", "+09:30", "+10:00", "+12:00", "-03:00", "-04:00", "-05:00", "-06:00", "-07:00",
             "-08:00")


def date(c: Convo) -> str:
    rng = c.rng
    kind = rng.choices(("add", "sub", "diff", "now"), weights=(3, 2, 3, 2))[0]
    if kind in ("add", "sub"):
        d, n = c.date(), c.num(1, 999)
        if kind == "add":
            c.user(rng.choice(("What date is {n} days after {d}?", "What is {d} plus {n} days?",
                               "Add {n} days to {d}.")).format(n=n, d=d))
            r = c.call(f"I will add {n} days to {d} with date_add.", "date_add", date=d, days=n)
            c.reply(f"The new date is {r}.", f"{n} days after {d} is {r}.")
        else:
            c.user(rng.choice(("What date was {n} days before {d}?", "What is {d} minus {n} days?",
                               "Go back {n} days from {d}.")).format(n=n, d=d))
            r = c.call(f"I will add -{n} days to {d} with date_add.",
                       "date_add", date=d, days=-n)
            c.reply(f"The new date is {r}.", f"{n} days before {d} was {r}.")
        return r
    if kind == "diff":
        start = c.date()
        end = dt.date.fromisoformat(start) + dt.timedelta(days=rng.randint(1, 1500))
        end = c.slot("date", end.isoformat())
        c.user(rng.choice(("How many days are there from {a} to {b}?", "How many days between {a} and {b}?",
                           "Count the days from {a} to {b}.")).format(a=start, b=end))
        r = show(c.call("I will count the days with date_diff.", "date_diff",
                        start=start, end=end))
        c.reply(f"The result is {r}.", f"There are {r} days from {start} to {end}.")
        return r
    tz = c.rng.choice(TIMEZONES)
    if tz != "UTC":  # the default zone stays in training: "What time is it?" must be learned
        c.slot("tz", tz)
    if tz == "UTC" and rng.random() < 0.5:
        c.user(rng.choice(("What time is it?", "What time is it now?", "What is the current time?")))
        r = c.call("I will use current_time.", "current_time")
    else:
        where = tz if tz == "UTC" else rng.choice((tz, "UTC" + tz))
        c.user(rng.choice(("What time is it in {z}?", "What is the current time in {z}?",
                           "Tell me the time in {z}.")).format(z=where))
        r = c.call(f"I will use current_time for {where}.", "current_time",
                   timezone=where)
    c.reply(f"The time is {r}.", f"It is {r}.")
    return r


def lookup_calc(c: Convo) -> str:
    rng = c.rng
    kind = rng.randrange(3)
    if kind == 2:
        p = c.pick("planet", list(TABLES["planets"]))
        c.user(rng.choice(("What is the diameter of {p} in km?", "How wide is {p} in km?")).format(p=p))
        radius = show(c.call(f"I will look up {p} in planets.", "lookup",
                             table="planets", key=p)["radius_km"])
        e = f"2*{radius}"
        r = show(c.call(f"The radius is {radius}. I will compute {e}.", "calculator", expression=e))
        c.reply(f"The result is {r}.", f"The diameter of {p} is {r} km.")
        return r
    el, k = c.pick("element", list(TABLES["elements"])), c.num(2, 999)
    field, label = (("mass", "atomic mass"), ("number", "atomic number"))[kind]
    if kind == 0:
        c.user(rng.choice(("What is the mass of {k} moles of {el} in grams?",
                           "How many grams do {k} moles of {el} weigh?")).format(k=k, el=el))
    else:
        c.user(rng.choice(("How many protons are in {k} atoms of {el}?",
                           "Count the protons in {k} atoms of {el}.")).format(k=k, el=el))
    v = show(c.call(f"I will look up {el} in elements.", "lookup",
                    table="elements", key=el)[field])
    e = f"{k}*{v}"
    r = show(c.call(f"The {label} is {v}. I will compute {e}.", "calculator", expression=e))
    c.reply(f"The result is {r}.",
            f"{k} moles of {el} weigh {r} g." if kind == 0 else f"{k} atoms of {el} have {r} protons.")
    return r


SCALE_ASK = {"length": "A lap is {v} {a}. How far are {k} laps in {b}?",
             "mass": "A box weighs {v} {a}. How much do {k} boxes weigh in {b}?",
             "volume": "A bottle holds {v} {a}. How much do {k} bottles hold in {b}?",
             "time": "A song lasts {v} {a}. How long are {k} songs in {b}?"}
SUM_ASK = {"length": "I walked {x} {a} and then {y} {a}. How many {b} is that?",
           "mass": "I bought {x} {a} and {y} {a} of flour. What is the total in {b}?",
           "volume": "I drank {x} {a} and {y} {a} of water. What is the total in {b}?",
           "time": "I worked {x} {a} and then {y} {a}. How many {b} is that?"}


def convert_calc(c: Convo) -> str:
    rng = c.rng
    dim = rng.choice(tuple(SCALE_ASK))
    a, b = units(c, (dim,))
    if rng.random() < 0.5:
        v, k = c.value(), c.num(2, 99)
        c.user(SCALE_ASK[dim].format(v=v, a=a, k=k, b=b))
        x = show(c.call(f"First I convert {v} {a} to {b}.", "convert_units", value=v, from_unit=a, to_unit=b))
        e = f"{k}*{x}"
        r = show(c.call(f"That is {x} {b}. I will compute {e}.", "calculator", expression=e))
        c.reply(f"The result is {r}.", f"The total is {r} {b}.")
        return r
    x, y = c.num(1, 999), c.num(1, 999)
    c.user(SUM_ASK[dim].format(x=x, y=y, a=a, b=b))
    e = f"{x}+{y}"
    s = c.call(f"First I compute {e}.", "calculator", expression=e)
    r = show(c.call(f"That is {s} {a}. I will convert it to {b}.", "convert_units", value=s, from_unit=a,
                    to_unit=b))
    c.reply(f"The result is {r} {b}.", f"The total is {r} {b}.")
    return r


NAMES = ("Alice", "Bob", "Carlos", "Dana", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Kofi", "Lena",
         "Mei", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Ximena",
         "Yusuf", "Zara", "Aiko", "Bruno", "Chloe", "Diego", "Emma", "Felix", "Hana", "Ivan", "Julia",
         "Kenji")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "teal", "gray",
          "brown")
CITIES = ("Lyon", "Osaka", "Porto", "Denver", "Quito", "Busan", "Cork", "Perth", "Malmo", "Graz", "Kyoto",
          "Bergen")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
WORDS = ("tiger", "maple", "comet", "river", "falcon", "cedar", "orbit", "pebble", "lotus", "ember")
KV_KEYS = (("locker code", "code"), ("door code", "code"), ("bike lock code", "code"),
           ("favorite color", "color"), ("car color", "color"), ("pet name", "name"), ("best friend", "name"),
           ("manager", "name"), ("home city", "city"), ("next trip", "city"), ("parking spot", "room"),
           ("desk", "room"), ("meeting room", "room"), ("gym day", "day"), ("piano lesson day", "day"),
           ("lucky number", "number"), ("shoe size", "number"), ("hotel room", "number"),
           ("wifi password", "word"), ("project name", "word"))
REMEMBER = ("Remember that my {k} is {v}.", "Please save my {k}: {v}.", "Note that my {k} is {v}.",
            "My {k} is {v}. Remember it.")
RECALL = ("What is my {k}?", "Do you remember my {k}?", "Remind me of my {k}.", "What was my {k} again?")


def kv_pair(c: Convo) -> tuple[str, str]:
    key, kind = c.rng.choice(KV_KEYS)
    rng = c.rng
    value = {"code": lambda: str(rng.randint(1000, 9999)), "color": lambda: rng.choice(COLORS),
             "name": lambda: rng.choice(NAMES), "city": lambda: rng.choice(CITIES),
             "room": lambda: f"{rng.choice('ABCDEFG')}{rng.randint(1, 40)}", "day": lambda: rng.choice(DAYS),
             "number": lambda: str(rng.randint(1, 999)),
             "word": lambda: f"{rng.choice(WORDS)}{rng.randint(10, 99)}"}
    return c.slot("kv_key", key), c.slot("kv_value", value[kind]())


def memory(c: Convo) -> str:
    rng = c.rng
    kind = rng.choices(("recall", "same_turn", "list"), weights=(3, 2, 2))[0]
    k, v = kv_pair(c)
    if kind == "same_turn":
        ask = rng.choice(("Save {v} as my {k} and read it back.", "Store my {k} as {v}, then check it."))
        c.user(ask.format(k=k, v=v))
        c.call(f"I will save {k} with kv_set.", "kv_set", key=k, value=v)
        got = c.call(f"Saved. I will read {k} with kv_get.", "kv_get", key=k)
        c.reply(f"The value is {got}.", f"Saved. Your {k} is {got}.")
        return got
    if kind == "recall":
        c.user(rng.choice(REMEMBER).format(k=k, v=v))
        c.call(f"I will save {k} with kv_set.", "kv_set", key=k, value=v)
        c.reply("The value is saved.", f"OK, I saved your {k}.")
        c.user(rng.choice(RECALL).format(k=k))
        got = c.call(f"I will read {k} with kv_get.", "kv_get", key=k)
        c.reply(f"The value is {got}.", f"Your {k} is {got}.")
        return got
    k2, v2 = kv_pair(c)
    if k2 == k:
        raise Reject
    c.user(f"Remember that my {k} is {v} and my {k2} is {v2}.")
    c.call(f"I will save {k} with kv_set.", "kv_set", key=k, value=v)
    c.call(f"Now I will save {k2}.", "kv_set", key=k2, value=v2)
    c.reply("Both values are saved.", f"OK, I saved your {k} and your {k2}.")
    c.user(rng.choice(("What have you saved for me?", "Which keys have I saved?", "List my saved notes.")))
    keys = ", ".join(c.call("I will use kv_list.", "kv_list"))
    c.reply(f"The keys are {keys}.", f"You saved: {keys}.")
    return keys


CHAT = {  # kind: (phrasings, reasoning, answer, answer substring)
    "greet": (("Hi", "Hello", "Hey", "Good morning", "Good evening", "Good afternoon", "Hi there",
               "Hello there", "Hey there", "Greetings", "Howdy", "Hiya"),
              "The user greets me. No tool is needed.", "Hello{name}! How can I help you today?", "Hello"),
    "identity": (("Who are you?", "What is your name?", "What's your name?", "Tell me about yourself.",
                  "Who made you?", "Who created you?", "Are you a human?", "What are you?",
                  "Introduce yourself.", "Who built you?", "Which company made you?", "Are you an AI?"),
                 "The user asks who I am. No tool is needed.",
                 "I am Kimi, an AI assistant created by Moonshot AI.", "Kimi"),
    "thanks": (("Thanks!", "Thank you!", "Thanks a lot.", "Thank you very much!", "Cheers, thanks.",
                "Great, thanks!", "Many thanks.", "Thanks for the help.", "Thank you so much.",
                "Much appreciated!"),
               "The user thanks me. No tool is needed.", "You're welcome!", "welcome"),
    "abilities": (("What can you do?", "How can you help me?", "What tools do you have?",
                   "What are you able to do?", "Can you help me?", "What do you know how to do?",
                   "What are your skills?", "What kind of tasks can you do?"),
                  "The user asks what I can do. No tool is needed.",
                  "I can calculate, convert units, look up facts, work with dates and remember notes.",
                  "calculate"),
    "bye": (("Bye!", "Goodbye.", "See you later!", "Good night!", "Talk to you later.", "Bye for now.",
             "See you soon!", "Have a good day!"),
            "The user says goodbye. No tool is needed.", "Goodbye! Have a nice day.", "Goodbye"),
}


def chat(c: Convo) -> str:
    kind = c.rng.choice(tuple(CHAT))
    phrasings, reasoning, answer, expected = CHAT[kind]
    text = c.pick("phrase", phrasings)
    name = ""
    if kind == "greet":
        if c.rng.random() < 0.5:
            name = c.pick("name", NAMES)
            text = f"{text}, I'm {name}{c.rng.choice('.!')}"
            name = f", {name}"
        else:
            text += c.rng.choice(("!", ".", ""))
    c.user(text)
    c.reply(reasoning, answer.format(name=name))
    return expected


FAMILIES = {  # name: (generator, share of the training set)
    "calculator": (calculator, 3.0), "convert": (convert, 2.0), "lookup": (lookup, 2.0), "date": (date, 2.0),
    "lookup_calc": (lookup_calc, 1.5), "convert_calc": (convert_calc, 1.5), "memory": (memory, 1.5),
    "chat": (chat, 1.5)}


# ---- generation ----------------------------------------------------------------------------------

def user_text(item: dict) -> tuple[str, ...]:
    return tuple(m["content"] for m in item["messages"] if m["role"] == "user")


def make_item(family: str, item_id: str, rng: random.Random, split: str, max_tries: int = 10_000) -> dict:
    fill = FAMILIES[family][0]
    for _ in range(max_tries):
        c = Convo(item_id, rng, split)
        try:
            answer = fill(c)
        except Reject:
            continue
        if split == "eval" and not c.any_held:
            continue
        names = list(c.used)
        # Single-tool conversations sometimes declare one distractor, and chat one unused tool, so the
        # model learns to choose by name and that a declared tool need not be called. Multi-step ones
        # already declare two or three tools and would grow past the nano model's context.
        if len(names) <= 1 and rng.random() < 0.4:
            names.insert(rng.randint(0, len(names)), rng.choice([n for n in SPECS if n not in names]))
        return {"id": item_id, "family": family, "tools": [SPECS[n] for n in names], "messages": c.messages,
                "answer": answer}
    raise RuntimeError(f"no {split} item for {family} after {max_tries} tries")


def generate(seed: int = 0, n_train: int = 20000, n_eval: int = 200) -> tuple[list[dict], list[dict]]:
    rng = random.Random(f"kimi-agent-data/{seed}/train")
    families, weights = list(FAMILIES), [w for _, w in FAMILIES.values()]
    train = [make_item(rng.choices(families, weights)[0], f"train-{i:05d}", rng, "train")
             for i in range(n_train)]
    seen = {user_text(item) for item in train}
    rng = random.Random(f"kimi-agent-data/{seed}/eval")
    evals: list[dict] = []
    for f, family in enumerate(families):
        want = n_eval // len(families) + (f < n_eval % len(families))
        tries = 0
        while want:
            item = make_item(family, f"eval-{len(evals):04d}", rng, "eval")
            if user_text(item) not in seen:
                seen.add(user_text(item))
                evals.append(item)
                want -= 1
            tries += 1
            if tries > 100 * (n_eval // len(families) + 1):
                raise RuntimeError(f"too few distinct held-out {family} prompts; lower --n-eval")
    return train, evals


def write_jsonl(path: str, items: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out/agent_data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-eval", type=int, default=200)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    train, evals = generate(args.seed, args.n_train, args.n_eval)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evals)
    counts = {f: sum(item["family"] == f for item in evals) for f in FAMILIES}
    print(f"wrote {len(train)} train and {len(evals)} eval conversations to {args.out} in "
          f"{time.perf_counter() - t0:.1f}s; eval per family: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
