"""The single-tool and recovery families of kimi-k2-nano's agent data, the random values every
family draws, and the question wordings training uses. (The no-tool families are in
scripts/nano_no_tool.py, chains and follow-up turns in scripts/nano_chains.py.)

Each family fills a `make_agent_data.Convo` — the user's questions, the assistant's short reasoning,
its tool calls (run for real), and its answer — and returns the substring the final answer must
contain. The user's words come from `c.ask(KEY, ...)`, which draws from the conversation's phrasing
table: `ASK` below for training and the held-out set, or the separately written paraphrase table
(scripts/nano_eval_phrasings.py) for the paraphrase set. The assistant's side is the same for both.

What the data teaches, and how:
  copying   every argument (numbers of 1-7 digits, decimals, negatives, whole expressions with
            parentheses, unit spellings, dates, keys, names) is a literal substring of the question,
            and the reasoning restates it first; values are drawn at random, not from short lists
  judgment  greetings and questions no tool can answer get a brief honest reply and no tool call
  chains    two or three calls where a result is copied into the next call's arguments, and
            follow-up turns whose arguments come from the previous answer
  recovery  a call the tool rejects (a `^` power, `x` for times, `1,250`, "kms", 2024/03/15, a key
            the store lacks) followed by the corrected call the error message points to
"""

from __future__ import annotations

import json

from kimi_jax.tools import TABLES, evaluate, unit_spellings

UNITS = unit_spellings()
CONVERTIBLE = ("length", "mass", "volume", "time")  # linear units; temperature is handled apart
KELVIN = {name.lower() for name in UNITS["temperature"]["K"]}  # below its zero a value is an error, not data
KEY_KIND = {"countries": "country", "elements": "element", "planets": "planet"}


class Reject(Exception):
    """The drawn values belong to the other split (or clash); the conversation is drawn again."""


# Training wordings of every user message, by key. Paraphrase-set wordings of the same keys are in
# scripts/nano_eval_phrasings.py and must never appear here (tests check this).
ASK = {
    "calc": ("What is {e}?", "Calculate {e}.", "Compute {e}.", "What's {e}?", "Work out {e}.", "How much is {e}?",
             "Evaluate {e}.", "Please calculate {e}.", "{e} = ?", "Solve {e}.", "what is {e}"),
    "convert": ("Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?",
                "{v} {a} in {b}, please.", "Please convert {v} {a} into {b}.", "How many {b} are in {v} {a}?",
                "convert {v} {a} to {b}"),
    "fact": ("What is the {label} of {k}?", "Give me the {label} of {k}.", "Look up the {label} of {k}.",
             "Tell me the {label} of {k}.", "What's the {label} of {k}?"),
    "date_add": ("What date is {n} days after {d}?", "What is {d} plus {n} days?", "Add {n} days to {d}."),
    "date_sub": ("What date was {n} days before {d}?", "What is {d} minus {n} days?", "Go back {n} days from {d}."),
    "date_diff": ("How many days are there from {a} to {b}?", "How many days between {a} and {b}?",
                  "Count the days from {a} to {b}."),
    "time": ("What time is it?", "What time is it now?", "What is the current time?"),
    "time_in": ("What time is it in {z}?", "What is the current time in {z}?", "Tell me the time in {z}."),
    "remember": ("Remember that my {k} is {v}.", "Please save my {k}: {v}.", "Note that my {k} is {v}.",
                 "My {k} is {v}. Remember it.", "Save {v} as my {k}."),
    "recall": ("What is my {k}?", "Do you remember my {k}?", "Remind me of my {k}.", "What was my {k} again?"),
    "save_and_check": ("Save {v} as my {k} and read it back.", "Store my {k} as {v}, then check it."),
    "save_two": ("Remember that my {k} is {v} and my {k2} is {v2}.", "Save my {k} ({v}) and my {k2} ({v2})."),
    "list": ("What have you saved for me?", "Which keys have I saved?", "List my saved notes."),
    "moles": ("What is the mass of {n} moles of {el} in grams?", "How many grams do {n} moles of {el} weigh?"),
    "protons": ("How many protons are in {n} atoms of {el}?", "Count the protons in {n} atoms of {el}."),
    "diameter": ("What is the diameter of {p} in km?", "How wide is {p} in km?"),
    "diameter_in": ("What is the diameter of {p} in {b}?", "How wide is {p} in {b}?"),
    "moles_in": ("What do {n} moles of {el} weigh in {b}?", "What is the mass of {n} moles of {el} in {b}?"),
    "scale": ("One item is {v} {a}. How much are {n} items in {b}?",
              "A piece measures {v} {a}. What do {n} pieces make in {b}?"),
    "sum_convert": ("I have {x} {a} and {y} {a}. How many {b} is that in total?",
                    "Add {x} {a} and {y} {a} and give the total in {b}."),
    "weeks": ("How many weeks are there from {a} to {b}?", "How many weeks between {a} and {b}?"),
    "days_from_now": ("What date is it {n} days from now?", "What will the date be in {n} days?"),
    "then_times": ("Compute {e}, then multiply the result by {m}.", "Work out {e} and multiply it by {m}."),
    "my_times": ("What is my {k} times {m}?", "Multiply my {k} by {m}."),
    "convert_then": ("Convert {v} {a} to {b}, then {op} {n}.", "Convert {v} {a} to {b} and {op} {n}.",
                     "Change {v} {a} into {b}, then {op} {n}.", "First convert {v} {a} to {b}, then {op} {n}."),
    # follow-up turns: "that" is the previous answer
    "more_add": ("Now add {n} to that.", "Add {n} to that.", "Now add {n}.", "And plus {n}?", "What if I add {n}?",
                 "Add {n} to the result.", "now add {n} to it"),
    "more_sub": ("Now subtract {n} from that.", "Subtract {n} from it.", "Take away {n}.", "And minus {n}?",
                 "Now subtract {n}."),
    "more_mul": ("Multiply that by {n}.", "Now multiply it by {n}.", "And times {n}?", "Now times {n}.",
                 "Multiply the result by {n}."),
    "more_div": ("Divide that by {n}.", "Now divide it by {n}.", "And divided by {n}?", "Divide the result by {n}."),
    "more_convert": ("What is that in {b}?", "And in {b}?", "Convert that to {b}.", "How many {b} is that?",
                     "Now in {b}, please."),
    "more_days": ("And {n} days after that?", "Add another {n} days.", "What about {n} days later?"),
}
REPLY_CALC = ("{e} = {r}.", "The answer is {r}.", "{e} is {r}.")

# ---- random values ---------------------------------------------------------------------------------

SYLLABLES = ("ba be bi bo bu da de di do ka ke ki ko la le li lo lu ma me mi mo na ne ni no pa pe po ra re ri ro "
             "sa se si so ta te ti to va ve vi za zo tra bre dri glo pla stu kro fen mar tis lon dor ven sal").split()


def pseudo_word(rng, syllables=(2, 3)) -> str:
    """A pronounceable random word ('maditro'): a name, key or value no table or training list holds."""
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(syllables)))


def operand(c) -> str:
    """A number as a user writes it: 1-6 digit integers (short ones more often) or a decimal."""
    if c.rng.random() < 0.15:
        return c.decimal()
    return str(c.integer(c.rng.choices((1, 2, 3, 4, 5, 6), (14, 26, 26, 18, 10, 6))[0]))


def expression(c) -> str:
    """A random arithmetic expression of 2-5 operands with precedence and parentheses; its value is
    an int or float under 10**12 (so answers stay copyable)."""
    rng = c.rng
    for _ in range(100):
        n = rng.choices((2, 3, 4, 5), (45, 30, 17, 8))[0]
        terms = [operand(c) for _ in range(n)]
        ops = rng.choices(("+", "-", "*", "/", "//", "%"), (30, 25, 28, 12, 3, 2), k=n - 1)
        if rng.random() < 0.08:  # a small power
            i = rng.randrange(n - 1)
            terms[i], terms[i + 1], ops[i] = str(c.between(2, 30)), str(rng.choice((2, 3))), "**"
        if rng.random() < 0.1:
            terms[0] = "-" + terms[0]
        if n > 2 and rng.random() < 0.45:  # parentheses around a proper sub-range
            i = rng.randrange(n - 1)
            j = rng.randrange(i + 1, n if i else n - 1)
            terms[i], terms[j] = "(" + terms[i], terms[j] + ")"
        sep = " " if rng.random() < 0.65 else ""
        text = terms[0] + "".join(f"{sep}{op}{sep}{t}" for op, t in zip(ops, terms[1:]))
        try:
            value = evaluate(text)
        except Exception:  # noqa: BLE001 - division by zero and the like: draw again
            continue
        if abs(value) < 1e12 and "e" not in json.dumps(value):
            return text
    raise RuntimeError("no valid expression drawn")


def spelled_units(c, dim: str) -> tuple[str, str]:
    """Two distinct units of one dimension, each in one of the spellings the tool accepts (which
    ignores case; temperature names are mostly capitalized, as people write them)."""
    a, b = c.rng.sample(list(UNITS[dim]), 2)
    c.slot("pair", f"{a}>{b}")

    def spell(unit):
        name = c.rng.choice(UNITS[dim][unit])
        return name.title() if dim == "temperature" and len(name) > 2 and c.rng.random() < 0.7 else name

    return spell(a), spell(b)


def show(x) -> str:
    return x if isinstance(x, str) else json.dumps(x)


# ---- single-tool families ---------------------------------------------------------------------------

def calculator(c) -> str:
    e = expression(c)
    c.ask("calc", e=e)
    r = show(c.call(f"The user wants {e}. I will use the calculator.", "calculator", expression=e)["result"])
    c.reply(f"The result is {r}.", c.rng.choice(REPLY_CALC).format(e=e, r=r))
    return r


def convert(c) -> str:
    if c.rng.random() < 0.2:
        dim, v = "temperature", c.slot("n", str(c.rng.randint(-40, 450)))
    else:
        dim, v = c.rng.choice(CONVERTIBLE), operand(c)
    a, b = spelled_units(c, dim)
    if dim == "temperature" and a.lower() in KELVIN:
        v = v.lstrip("-")  # below absolute zero would be an error, not a conversion
    c.ask("convert", v=v, a=a, b=b)
    r = show(c.call(f"I will convert {v} {a} to {b} with convert_units.", "convert_units",
                    value=json.loads(v), from_unit=a, to_unit=b)["result"])
    c.reply(f"The result is {r} {b}.", f"{v} {a} is {r} {b}.")
    return r


FACTS = {  # table: (field, label, reply)
    "countries": (("capital", "capital", "The capital of {k} is {v}."), ("continent", "continent", "{k} is in {v}."),
                  ("currency", "currency", "The currency of {k} is {v}.")),
    "elements": (("number", "atomic number", "The atomic number of {k} is {v}."),
                 ("mass", "atomic mass", "The atomic mass of {k} is {v}."),
                 ("symbol", "chemical symbol", "The chemical symbol of {k} is {v}.")),
    "planets": (("order", "position from the Sun", "{k} is planet number {v} from the Sun."),
                ("radius_km", "radius in km", "The radius of {k} is {v} km.")),
}


def lookup(c) -> str:
    table = c.rng.choice(tuple(FACTS))
    field, label, say = c.rng.choice(FACTS[table])
    if c.rng.random() < 0.2:  # a key the table lacks: copy it anyway, read the error, say so
        k = c.word().capitalize()
        c.ask("fact", label=label, k=k)
        c.call(f"I will look up {k} in {table}.", "lookup", error=True, table=table, key=k)
        c.reply(f"{k} is not in the {table} table.", f"Sorry, I could not find {k} in the {table} table.")
        return "could not find"
    k = c.pick(KEY_KIND[table], list(TABLES[table]))
    c.slot("fact", f"{k}/{field}")
    if c.rng.random() < 0.2:
        k = k.lower()
    c.ask("fact", label=label, k=k)
    v = show(c.call(f"I will look up {k} in {table}.", "lookup", table=table, key=k)[field])
    c.reply(f"The {label} of {k} is {v}.", say.format(k=k, v=v))
    return v


def timezone(c) -> str:
    """A UTC offset as people write it: +05:30, UTC-8, GMT+2."""
    hours, minutes = c.rng.randint(-11, 14), c.rng.choice((0, 0, 0, 30, 45))
    sign = "-" if hours < 0 else "+"
    style = c.rng.randrange(3)
    if style == 0 or minutes:
        text = f"{sign}{abs(hours):02d}:{minutes:02d}"
        text = text if style == 0 else c.rng.choice(("UTC", "GMT")) + text
    else:
        text = f"{c.rng.choice(('UTC', 'GMT'))}{sign}{abs(hours)}"
    return c.slot("tz", text)


def date(c) -> str:
    kind = c.rng.choices(("add", "sub", "diff", "now"), (3, 2, 3, 3))[0]
    if kind in ("add", "sub"):
        d, n = c.date(), c.integer(c.rng.choices((1, 2, 3, 4, 5), (15, 30, 30, 20, 5))[0])
        if kind == "add":
            c.ask("date_add", n=n, d=d)
            r = c.call(f"I will add {n} days to {d} with date_add.", "date_add", date=d, days=n)["result"]
            c.reply(f"The new date is {r}.", f"{n} days after {d} is {r}.")
        else:
            c.ask("date_sub", n=n, d=d)
            r = c.call(f"I will add -{n} days to {d} with date_add.", "date_add", date=d, days=-n)["result"]
            c.reply(f"The new date is {r}.", f"{n} days before {d} was {r}.")
        return r
    if kind == "diff":
        a, b = sorted((c.date(), c.date())) if c.rng.random() < 0.85 else (c.date(), c.date())
        c.ask("date_diff", a=a, b=b)
        r = show(c.call(f"I will count the days from {a} to {b} with date_diff.", "date_diff",
                        start=a, end=b)["result"])
        c.reply(f"The result is {r}.", f"There are {r} days from {a} to {b}.")
        return r
    if c.rng.random() < 0.5:  # the default zone: "What time is it?" must be learned too
        c.ask("time")
        r = c.call("I will use current_time.", "current_time")["result"]
    else:
        z = timezone(c)
        c.ask("time_in", z=z)
        r = c.call(f"I will use current_time for {z}.", "current_time", timezone=z)["result"]
    c.reply(f"The time is {r}.", f"It is {r}.")
    return r


KEY_NOUNS = ("code", "password", "number", "name", "color", "city", "room", "day", "pin", "word", "spot", "tag")
KEY_OWNERS = ("locker", "door", "bike", "wifi", "car", "office", "gym", "hotel", "parking", "project", "garden",
              "studio", "laptop", "alarm", "mailbox", "boat", "cabin", "team", "guest", "backup")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "teal", "gray", "brown")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def kv_key(c, nouns=KEY_NOUNS) -> str:
    """A key like 'locker code', 'favorite color', 'zanelo password' or 'trip to Kovarin'."""
    rng = c.rng
    style = rng.randrange(4 if nouns is KEY_NOUNS else 3)
    if style == 0:
        key = f"{rng.choice(KEY_OWNERS)} {rng.choice(nouns)}"
    elif style == 1:
        key = f"{c.word()} {rng.choice(nouns)}"
    elif style == 2:
        key = f"{rng.choice(('favorite', 'lucky', 'secret', 'new', 'old', 'spare'))} {rng.choice(nouns)}"
    else:
        key = f"{rng.choice(('trip to', 'meeting with', 'gift for', 'call with'))} {c.word().capitalize()}"
    return c.slot("kv_key", key)


def kv_value(c, numeric: bool = False) -> str:
    rng = c.rng
    if numeric:
        return str(c.integer(rng.choice((1, 2, 3, 4))))
    draw = rng.choice((lambda: str(c.integer(rng.randint(3, 8))), c.word, lambda: c.word().capitalize(),
                       lambda: rng.choice(COLORS), lambda: f"{rng.choice('ABCDEFGH')}{c.integer(rng.randint(1, 3))}",
                       lambda: rng.choice(DAYS), lambda: f"{c.word()}{c.integer(2)}"))
    return c.slot("kv_value", draw())


def memory(c) -> str:
    kind = c.rng.choices(("recall", "same_turn", "list", "missing"), (4, 2, 2, 1))[0]
    k, v = kv_key(c), kv_value(c)
    if kind == "missing":  # asked for a key never saved: read the error, do not guess
        c.ask("recall", k=k)
        c.call(f"I will read {k} with kv_get.", "kv_get", error=True, key=k)
        c.reply(f"{k} is not saved.", f"You have not saved your {k} yet.")
        return "not saved"
    if kind == "same_turn":
        c.ask("save_and_check", k=k, v=v)
        c.call(f"I will save {k} as {v} with kv_set.", "kv_set", key=k, value=v)
        got = c.call(f"Saved. I will read {k} with kv_get.", "kv_get", key=k)["result"]
        c.reply(f"The value is {got}.", f"Saved. Your {k} is {got}.")
        return got
    if kind == "recall":
        c.ask("remember", k=k, v=v)
        c.call(f"I will save {k} as {v} with kv_set.", "kv_set", key=k, value=v)
        c.reply("The value is saved.", f"OK, I saved your {k}.")
        if c.rng.random() < 0.3:  # something else in between: the store outlives the turn
            calculator(c)
        c.ask("recall", k=k)
        got = c.call(f"I will read {k} with kv_get.", "kv_get", key=k)["result"]
        c.reply(f"The value is {got}.", f"Your {k} is {got}.")
        return got
    k2, v2 = kv_key(c), kv_value(c)
    if k2 == k:
        raise Reject
    c.ask("save_two", k=k, v=v, k2=k2, v2=v2)
    c.call(f"I will save {k} as {v} with kv_set.", "kv_set", key=k, value=v)
    c.call(f"Now I will save {k2} as {v2}.", "kv_set", key=k2, value=v2)
    c.reply("Both values are saved.", f"OK, I saved your {k} and your {k2}.")
    c.ask("list")
    keys = ", ".join(c.call("I will use kv_list.", "kv_list")["result"])
    c.reply(f"The keys are {keys}.", f"You saved: {keys}.")
    return keys


# ---- recovery: the tool rejects the literal copy, the error says how to fix it --------------------------

def recovery(c) -> str:
    kind = c.rng.choice(("caret", "times", "thousands", "plural_unit", "slash_date"))
    if kind in ("caret", "times", "thousands"):
        a, b = c.integer(c.rng.choice((1, 2))), c.integer(c.rng.choice((1, 2, 3)))
        if kind == "caret":
            a, b = c.between(2, 20), c.rng.choice((2, 3, 4))
            wrong, right = f"{a}^{b}", f"{a}**{b}"
        elif kind == "times":
            sym = c.rng.choice(("x", "×"))
            wrong, right = f"{a} {sym} {b}", f"{a} * {b}"
        else:
            big = c.integer(c.rng.choice((4, 5, 6)))
            wrong = f"{big:,} + {b}"
            right = wrong.replace(",", "")
        c.ask("calc", e=wrong)
        c.call(f"The user wants {wrong}. I will use the calculator.", "calculator", error=True, expression=wrong)
        r = show(c.call(f"The calculator rejected it. I will write it as {right}.", "calculator",
                        expression=right)["result"])
        c.reply(f"The result is {r}.", f"{wrong} = {r}.")
        return r
    if kind == "plural_unit":
        dim = c.rng.choice(("length", "mass", "time"))
        # Abbreviations people pluralize ("kms", "hrs"); the tool knows only the singular.
        plural = {"length": ("km", "cm", "mm", "yd"), "mass": ("kg", "oz"), "time": ("min", "hr", "sec")}[dim]
        a = c.rng.choice(plural)
        b = c.rng.choice([u for u in UNITS[dim] if a not in UNITS[dim][u]])
        wrong, v = a + "s", operand(c)
        c.ask("convert", v=v, a=wrong, b=b)
        c.call(f"I will convert {v} {wrong} to {b} with convert_units.", "convert_units", error=True,
               value=json.loads(v), from_unit=wrong, to_unit=b)
        r = show(c.call(f"The unit {wrong} is unknown. I will use {a}.", "convert_units", value=json.loads(v),
                        from_unit=a, to_unit=b)["result"])
        c.reply(f"The result is {r} {b}.", f"{v} {wrong} is {r} {b}.")
        return r
    d, n = c.date(), c.integer(c.rng.choice((1, 2, 3)))
    wrong = d.replace("-", "/")
    c.ask("date_add", n=n, d=wrong)
    c.call(f"I will add {n} days to {wrong} with date_add.", "date_add", error=True, date=wrong, days=n)
    r = c.call(f"The date must look like {d}. I will use {d}.", "date_add", date=d, days=n)["result"]
    c.reply(f"The new date is {r}.", f"{n} days after {wrong} is {r}.")
    return r


def wrong_key(c) -> str:
    """Saved under one key, asked with a shorter one: the error lists the keys; use the saved one."""
    owner, noun = c.rng.choice(KEY_OWNERS), c.rng.choice(KEY_NOUNS)
    k, short = c.slot("kv_key", f"{owner} {noun}"), noun
    v = kv_value(c)
    c.ask("remember", k=k, v=v)
    c.call(f"I will save {k} as {v} with kv_set.", "kv_set", key=k, value=v)
    c.reply("The value is saved.", f"OK, I saved your {k}.")
    c.ask("recall", k=short)
    c.call(f"I will read {short} with kv_get.", "kv_get", error=True, key=short)
    got = c.call(f"There is no {short}, but there is {k}. I will read {k}.", "kv_get", key=k)["result"]
    c.reply(f"The value is {got}.", f"Your {k} is {got}.")
    return got
