"""The multi-step families of kimi-k2-nano's agent data: chains of two or three tool calls in one
turn, where a result is copied into the next call, and follow-up turns that refer to the previous
answer ("Now add 50 to that."), where the argument is copied from the conversation instead.

Each family fills a `make_agent_data.Convo` and returns the substring the final answer must
contain, like the single-tool families in scripts/nano_tasks.py, whose values and wordings these
reuse.
"""

from __future__ import annotations

import json

from nano_tasks import (
    CONVERTIBLE,
    KELVIN,
    REPLY_CALC,
    TABLES,
    UNITS,
    Reject,
    calculator,
    convert,
    expression,
    kv_key,
    kv_value,
    operand,
    show,
    spelled_units,
)

# ---- chains: a result copied into the next call ---------------------------------------------------------

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


OPERATIONS = {"add": "+", "subtract": "-", "multiply it by": "*", "divide it by": "/"}  # the user's words: operator


def convert_calc(c) -> str:
    kind = c.rng.choice(("scale", "sum", "then"))
    if kind == "then":  # "Convert 100 F to C, then add 10.": both steps, the second on the first's result
        dim = c.rng.choice(CONVERTIBLE + ("temperature",))
        v = c.slot("n", str(c.rng.randint(-40, 450))) if dim == "temperature" else operand(c)
        a, b = spelled_units(c, dim)
        if dim == "temperature" and a.lower() in KELVIN:
            v = v.lstrip("-")
        op, n = c.rng.choice(tuple(OPERATIONS)), c.integer(c.rng.choice((1, 1, 2, 3)))
        if op.startswith("divide") and n == 0:
            n = c.between(2, 9)
        c.ask("convert_then", v=v, a=a, b=b, op=op, n=n)
        x = show(c.call(f"First I convert {v} {a} to {b}.", "convert_units", value=json.loads(v), from_unit=a,
                        to_unit=b)["result"])
        if "e" in x:  # a result in scientific notation: not what a user means to add to
            raise Reject
        e = f"{x} {OPERATIONS[op]} {n}"
        r = show(c.call(f"That is {x} {b}. Then I {op} {n}: {e}.", "calculator", expression=e)["result"])
        c.reply(f"The result is {r}.", f"{v} {a} is {x} {b}, and {e} = {r}.")
        return r
    dim = c.rng.choice(CONVERTIBLE)
    a, b = spelled_units(c, dim)
    if kind == "scale":
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


# ---- follow-ups: the second turn works on the first turn's answer ----------------------------------------

FOLLOW_OPS = {"more_add": "+", "more_sub": "-", "more_mul": "*", "more_div": "/"}  # ASK key: operator


def follow_up(c) -> str:
    """Turn 1 a calculation, conversion or date; turn 2 refers to its answer ("Now add 50 to that.")
    and the model copies the number (and unit) from its own previous answer."""
    first = c.rng.choices(("calc", "convert", "date"), (5, 3, 1))[0]
    if first == "date":
        d, n = c.date(), c.integer(c.rng.choice((1, 2, 3)))
        c.ask("date_add", n=n, d=d)
        r = c.call(f"I will add {n} days to {d} with date_add.", "date_add", date=d, days=n)["result"]
        c.reply(f"The new date is {r}.", f"{n} days after {d} is {r}.")
        m = c.integer(c.rng.choice((1, 2, 3)))
        c.ask("more_days", n=m)
        r2 = c.call(f"The previous date was {r}. I will add {m} days to {r}.", "date_add", date=r, days=m)["result"]
        c.reply(f"The new date is {r2}.", f"{m} days after {r} is {r2}.")
        return r2
    if first == "convert" and c.rng.random() < 0.5:  # the same quantity in a third unit
        dim = c.rng.choice(CONVERTIBLE)
        a, b = spelled_units(c, dim)
        v = operand(c)
        c.ask("convert", v=v, a=a, b=b)
        r = c.call(f"I will convert {v} {a} to {b} with convert_units.", "convert_units", value=json.loads(v),
                   from_unit=a, to_unit=b)["result"]
        c.reply(f"The result is {show(r)} {b}.", f"{v} {a} is {show(r)} {b}.")
        if "e" in show(r):
            raise Reject
        third = c.rng.choice([u for u in UNITS[dim] if b not in UNITS[dim][u] and a not in UNITS[dim][u]])
        t = c.rng.choice(UNITS[dim][third])
        c.ask("more_convert", b=t)
        r2 = show(c.call(f"The previous result was {show(r)} {b}. I will convert it to {t}.", "convert_units",
                         value=r, from_unit=b, to_unit=t)["result"])
        c.reply(f"The result is {r2} {t}.", f"{show(r)} {b} is {r2} {t}.")
        return r2
    r = (calculator if first == "calc" else convert)(c)
    if "e" in r:
        raise Reject
    key = c.rng.choice(tuple(FOLLOW_OPS))
    n = c.integer(c.rng.choice((1, 1, 2, 2, 3)))
    if key == "more_div" and n == 0:
        n = c.between(2, 9)
    c.ask(key, n=n)
    e = f"{r} {FOLLOW_OPS[key]} {n}"
    r2 = show(c.call(f"The previous result was {r}. I will compute {e}.", "calculator", expression=e)["result"])
    c.reply(f"The result is {r2}.", c.rng.choice(REPLY_CALC).format(e=e, r=r2))
    return r2
