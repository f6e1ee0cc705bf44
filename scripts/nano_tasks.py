"""The task families of kimi-k2-nano's agent data, and the question wordings training uses.

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
  chains    two or three calls where a result is copied into the next call's arguments
  recovery  a call the tool rejects (a `^` power, `x` for times, `1,250`, "kms", 2024/03/15, a key
            the store lacks) followed by the corrected call the error message points to
"""

from __future__ import annotations

import json

from kimi_jax.tools import TABLES, evaluate, unit_spellings

UNITS = unit_spellings()
CONVERTIBLE = ("length", "mass", "volume", "time")  # linear units; temperature is handled apart
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
    """Two distinct units of one dimension, each in one of the spellings the tool accepts."""
    a, b = c.rng.sample(list(UNITS[dim]), 2)
    c.slot("pair", f"{a}>{b}")
    return c.rng.choice(UNITS[dim][a]), c.rng.choice(UNITS[dim][b])


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
    if c.rng.random() < 0.15:
        dim, v = "temperature", c.slot("n", str(c.rng.randint(-40, 450)))
    else:
        dim, v = c.rng.choice(CONVERTIBLE), operand(c)
    a, b = spelled_units(c, dim)
    if dim == "temperature" and a.lower() in ("k", "kelvin"):
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
    kind = c.rng.choices(("add", "sub", "diff", "now"), (3, 2, 3, 2))[0]
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
    if c.rng.random() < 0.3:  # the default zone: "What time is it?" must be learned too
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


# ---- no tool: greetings and questions the tools cannot answer ------------------------------------------

IDENTITY = "I am Kimi, an AI assistant created by Moonshot AI."
ABILITIES = "I can calculate, convert units, look up countries, elements and planets, work with dates and remember notes."
CANNOT = "Sorry, I can't answer that: none of my tools covers it. " + ABILITIES
CHAT = {  # kind: (phrasings, reasoning, reply, answer substring)
    "greet": (("Hi", "Hello", "Hey", "Good morning", "Good evening", "Good afternoon", "Hi there", "Hello there",
               "Hey there", "Greetings", "Howdy", "Hiya"),
              "The user greets me. No tool is needed.", "Hello{name}! How can I help you today?", "Hello"),
    "identity": (("Who are you?", "What is your name?", "What's your name?", "Tell me about yourself.",
                  "Who made you?", "Who created you?", "Are you a human?", "What are you?", "Introduce yourself.",
                  "Who built you?", "Which company made you?", "Are you an AI?"),
                 "The user asks who I am. No tool is needed.", IDENTITY, "Kimi"),
    "thanks": (("Thanks!", "Thank you!", "Thanks a lot.", "Thank you very much!", "Cheers, thanks.", "Great, thanks!",
                "Many thanks.", "Thanks for the help.", "Thank you so much.", "Much appreciated!"),
               "The user thanks me. No tool is needed.", "You're welcome!", "welcome"),
    "abilities": (("What can you do?", "How can you help me?", "What tools do you have?", "What are you able to do?",
                   "Can you help me?", "What do you know how to do?", "What are your skills?",
                   "What kind of tasks can you do?"),
                  "The user asks what I can do. No tool is needed.", ABILITIES, "calculate"),
    "bye": (("Bye!", "Goodbye.", "See you later!", "Good night!", "Talk to you later.", "Bye for now.",
             "See you soon!", "Have a good day!"),
            "The user says goodbye. No tool is needed.", "Goodbye! Have a nice day.", "Goodbye"),
}


def chat(c) -> str:
    kind = c.rng.choice(tuple(CHAT))
    phrasings, reasoning, answer, expected = CHAT[kind]
    text, name = c.pick("phrase", phrasings), ""
    if kind == "greet":
        if c.rng.random() < 0.4:
            name = c.word().capitalize()
            text, name = f"{text}, I'm {name}{c.rng.choice('.!')}", f", {name}"
        elif c.rng.random() < 0.4:  # a greeting with a question: answer both, still without a tool
            follow = c.rng.choice(("identity", "abilities"))
            text = f"{text}! {c.pick('phrase', CHAT[follow][0])}"
            c.user(text)
            c.reply("The user greets me and asks something about me. No tool is needed.",
                    f"Hello! {CHAT[follow][2]}")
            return CHAT[follow][3]
        else:
            text += c.rng.choice(("!", ".", ""))
    c.user(text)
    c.reply(reasoning, answer.format(name=name))
    return expected


OOD_TOPICS = {  # training templates of questions no builtin tool answers, and what fills them
    "Who is the president of {country}?": "country", "What language is spoken in {country}?": "country",
    "What is the national dish of {country}?": "country", "What is the weather like in {city} today?": "city",
    "Will it rain in {city} tomorrow?": "city", "What is the best hotel in {city}?": "city",
    "Who wrote {title}?": "title", "Summarize the book {title}.": "title", "Who directed {title}?": "title",
    "Tell me a joke about {thing}.": "thing", "Write a poem about {thing}.": "thing",
    "What is the price of {thing} today?": "thing", "Where can I buy {thing}?": "thing",
    "Translate '{thing}' into {language}.": "thing", "What is the stock price of {company}?": "company",
    "Who founded {company}?": "company", "Who won the {year} World Cup?": "year",
    "What happened in {year}?": "year", "What is the meaning of life?": "", "What should I eat for dinner?": "",
    "Can you send an email for me?": "", "Play some music.": "", "What is the latest news?": "",
}
OOD_FILL = {
    "city": lambda c: c.rng.choice(("Lyon", "Osaka", "Porto", "Denver", "Quito", "Busan", "Cork", "Perth",
                                    "Graz", "Kyoto", "Bergen")) if c.rng.random() < 0.5 else c.word().capitalize(),
    "country": lambda c: c.rng.choice(list(TABLES["countries"])),
    "title": lambda c: f"The {c.word().capitalize()} of {c.word().capitalize()}",
    "thing": lambda c: c.rng.choice(("cats", "coffee", "the sea", "winter", "bicycles", "robots", "bread",
                                     "mountains", "a good friend")) if c.rng.random() < 0.6 else c.word(),
    "company": lambda c: f"{c.word().capitalize()} {c.rng.choice(('Inc', 'Labs', 'Motors', 'Foods', 'Systems'))}",
    "year": lambda c: str(c.rng.randint(1930, 2022)),
}


def out_of_scope(c) -> str:
    template = c.pick("phrase", list(OOD_TOPICS))
    kind = OOD_TOPICS[template]
    fields = {"country": OOD_FILL["country"](c), "city": "", "title": "", "thing": "", "company": "", "year": ""}
    if kind:
        fields[kind] = OOD_FILL[kind](c)
    fields["language"] = c.rng.choice(("French", "German", "Spanish", "Japanese"))
    c.user(template.format(**fields))
    c.reply("None of my tools can answer this. No tool is needed.", CANNOT)
    return "can't"


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


# ---- multi-step: a result copied into the next call -----------------------------------------------------

def lookup_calc(c) -> str:
    kind = c.rng.randrange(3)
    if kind == 2:
        p = c.pick("planet", list(TABLES["planets"]))
        c.ask("diameter", p=p)
        radius = show(c.call(f"I will look up {p} in planets.", "lookup", table="planets", key=p)["radius_km"])
        e = f"2*{radius}"
        r = show(c.call(f"The radius is {radius} km. I will compute {e}.", "calculator", expression=e)["result"])
        c.reply(f"The result is {r}.", f"The diameter of {p} is {r} km.")
        return r
    el, n = c.pick("element", list(TABLES["elements"])), c.integer(c.rng.choice((1, 2, 3, 4)))
    field, label = (("mass", "atomic mass"), ("number", "atomic number"))[kind]
    c.ask(("moles", "protons")[kind], n=n, el=el)
    v = show(c.call(f"I will look up {el} in elements.", "lookup", table="elements", key=el)[field])
    e = f"{n}*{v}"
    r = show(c.call(f"The {label} is {v}. I will compute {e}.", "calculator", expression=e)["result"])
    c.reply(f"The result is {r}.", f"{n} moles of {el} weigh {r} g." if kind == 0 else
            f"{n} atoms of {el} have {r} protons.")
    return r


def three_step(c) -> str:
    """lookup -> calculator -> convert_units: a planet's diameter, or a mass of moles, in other units."""
    if c.rng.random() < 0.5:
        p = c.pick("planet", list(TABLES["planets"]))
        b = c.rng.choice(UNITS["length"]["mi"] + UNITS["length"]["m"])
        c.ask("diameter_in", p=p, b=b)
        radius = show(c.call(f"I will look up {p} in planets.", "lookup", table="planets", key=p)["radius_km"])
        e = f"2*{radius}"
        d = c.call(f"The radius is {radius} km. I will compute {e}.", "calculator", expression=e)["result"]
        r = show(c.call(f"The diameter is {show(d)} km. I will convert it to {b}.", "convert_units", value=d,
                        from_unit="km", to_unit=b)["result"])
        c.reply(f"The result is {r} {b}.", f"The diameter of {p} is {r} {b}.")
        return r
    el, n = c.pick("element", list(TABLES["elements"])), c.integer(c.rng.choice((1, 2, 3)))
    b = c.rng.choice(UNITS["mass"]["kg"] + UNITS["mass"]["lb"] + UNITS["mass"]["oz"])
    c.ask("moles_in", n=n, el=el, b=b)
    v = show(c.call(f"I will look up {el} in elements.", "lookup", table="elements", key=el)["mass"])
    e = f"{n}*{v}"
    g = c.call(f"The atomic mass is {v}. I will compute {e}.", "calculator", expression=e)["result"]
    r = show(c.call(f"That is {show(g)} g. I will convert it to {b}.", "convert_units", value=g, from_unit="g",
                    to_unit=b)["result"])
    c.reply(f"The result is {r} {b}.", f"{n} moles of {el} weigh {r} {b}.")
    return r


def convert_calc(c) -> str:
    dim = c.rng.choice(CONVERTIBLE)
    a, b = spelled_units(c, dim)
    if c.rng.random() < 0.5:
        v, n = operand(c), c.integer(c.rng.choice((1, 2)))
        c.ask("scale", v=v, a=a, n=n, b=b)
        x = show(c.call(f"First I convert {v} {a} to {b}.", "convert_units", value=json.loads(v), from_unit=a,
                        to_unit=b)["result"])
        e = f"{n}*{x}"
        r = show(c.call(f"That is {x} {b}. I will compute {e}.", "calculator", expression=e)["result"])
        c.reply(f"The result is {r}.", f"The total is {r} {b}.")
        return r
    x, y = operand(c), operand(c)
    c.ask("sum_convert", x=x, y=y, a=a, b=b)
    e = f"{x}+{y}"
    s = c.call(f"First I compute {e}.", "calculator", expression=e)["result"]
    r = show(c.call(f"That is {show(s)} {a}. I will convert it to {b}.", "convert_units", value=s, from_unit=a,
                    to_unit=b)["result"])
    c.reply(f"The result is {r} {b}.", f"The total is {r} {b}.")
    return r


def date_chain(c) -> str:
    if c.rng.random() < 0.5:
        a, b = sorted((c.date(), c.date()))
        c.ask("weeks", a=a, b=b)
        days = show(c.call(f"I will count the days from {a} to {b} with date_diff.", "date_diff", start=a,
                           end=b)["result"])
        e = f"{days}/7"
        r = show(c.call(f"That is {days} days. I will compute {e}.", "calculator", expression=e)["result"])
        c.reply(f"The result is {r}.", f"There are {r} weeks from {a} to {b}.")
        return r
    n = c.integer(c.rng.choice((1, 2, 3)))
    c.ask("days_from_now", n=n)
    now = c.call("First I need today's date. I will use current_time.", "current_time")["result"]
    today = now[:10]
    r = c.call(f"Today is {today}. I will add {n} days to {today}.", "date_add", date=today, days=n)["result"]
    c.reply(f"The new date is {r}.", f"In {n} days it will be {r}.")
    return r


def calc_chain(c) -> str:
    e, m = expression(c), c.integer(c.rng.choice((1, 2)))
    c.ask("then_times", e=e, m=m)
    x = show(c.call(f"First I compute {e}.", "calculator", expression=e)["result"])
    e2 = f"{x}*{m}"
    r = show(c.call(f"That is {x}. I will compute {e2}.", "calculator", expression=e2)["result"])
    c.reply(f"The result is {r}.", f"The result is {r}.")
    return r


def memory_calc(c) -> str:
    """Across turns: a number saved in one turn is read back and used in a calculation later."""
    k, v = kv_key(c, ("number", "code", "pin", "score", "count")), kv_value(c, numeric=True)
    m = c.integer(c.rng.choice((1, 2)))
    c.ask("remember", k=k, v=v)
    c.call(f"I will save {k} as {v} with kv_set.", "kv_set", key=k, value=v)
    c.reply("The value is saved.", f"OK, I saved your {k}.")
    c.ask("my_times", k=k, m=m)
    got = c.call(f"I will read {k} with kv_get.", "kv_get", key=k)["result"]
    e = f"{got}*{m}"
    r = show(c.call(f"Your {k} is {got}. I will compute {e}.", "calculator", expression=e)["result"])
    c.reply(f"The result is {r}.", f"Your {k} times {m} is {r}.")
    return r


SINGLE = {"calculator": (calculator, 3.0), "convert": (convert, 2.0), "lookup": (lookup, 2.0), "date": (date, 2.0),
          "memory": (memory, 1.5)}
NO_TOOL = {"chat": (chat, 1.0), "out_of_scope": (out_of_scope, 1.0)}
RECOVERY = {"recovery": (recovery, 0.8), "wrong_key": (wrong_key, 0.4)}
MULTI_STEP = {"lookup_calc": (lookup_calc, 1.0), "three_step": (three_step, 0.7), "convert_calc": (convert_calc, 1.0),
              "date_chain": (date_chain, 0.7), "calc_chain": (calc_chain, 0.7), "memory_calc": (memory_calc, 0.6)}
FAMILIES = {**SINGLE, **NO_TOOL, **RECOVERY, **MULTI_STEP}  # name: (generator, share of the training set)
