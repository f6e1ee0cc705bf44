"""Safe demo tools: `builtin_tools()` has no shell, network or file access.

Arithmetic, unit conversion, a small read-only fact table, ISO-date arithmetic, the time from an
injectable clock, and a bounded in-memory key-value store. Successful results are compact JSON such
as `{"result":391}`: short and regular, so a nano model can learn to read them. Expected failures
raise `ToolError`, which the registry hands to the model as `error: ...`.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import math
import re
import threading
from collections.abc import Callable
from typing import Literal

from kimi_jax.tools.registry import ToolError, ToolRegistry

# ---- builtin tools: arithmetic -------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 1e100  # results and intermediates; keeps big-int work and printed numbers small
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_ALLOWED = "numbers, + - * / // % ** and parentheses"


def _number(x, digits: int):
    """A float rounded to `digits` significant digits, shown as an int when it is whole."""
    if isinstance(x, int):
        return x
    x = float(f"{x:.{digits}g}")
    return int(x) if x.is_integer() and abs(x) < 1e15 else x


def _power(base, exp):
    if abs(exp) > 1000:
        raise ToolError("exponent too large")
    if abs(base) > 1 and exp > 0 and exp * math.log10(abs(base)) > 100:
        raise ToolError("result too large")
    try:
        result = base ** exp
    except ZeroDivisionError:  # 0 ** -1
        raise ToolError("division by zero") from None
    if isinstance(result, complex):
        raise ToolError("result is not a real number")
    return result


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            value = _power(a, b)
        elif type(node.op) in _BINARY:
            try:
                value = _BINARY[type(node.op)](a, b)
            except ZeroDivisionError:
                raise ToolError("division by zero") from None
        elif isinstance(node.op, ast.BitXor):
            raise ToolError("^ is not a power here; use ** (e.g. 2**10)")
        else:
            raise ToolError(f"only {_ALLOWED} are allowed")
        if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > MAX_MAGNITUDE:
            raise ToolError("result too large")
        return value
    if isinstance(node, ast.Name):
        raise ToolError(f"unknown name '{node.id}'; only {_ALLOWED} are allowed")
    raise ToolError(f"only {_ALLOWED} are allowed")


def evaluate(expression: str):
    """Safe arithmetic: the value of `expression`, ints kept exact, floats to 10 significant digits."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise ToolError(f"cannot parse expression '{expression}'") from None
    try:
        return _number(_eval(tree), 10)
    except OverflowError:
        raise ToolError("result too large") from None
    except RecursionError:
        raise ToolError("expression nested too deeply") from None


# ---- builtin tools: units ------------------------------------------------------------------------

# dimension -> canonical unit -> (factor to the dimension's base unit, comma-separated aliases)
_UNITS = {
    "length": {"m": (1.0, "meter,meters,metre,metres"),
               "km": (1000.0, "kilometer,kilometers,kilometre,kilometres"),
               "cm": (0.01, "centimeter,centimeters"), "mm": (0.001, "millimeter,millimeters"),
               "mi": (1609.344, "mile,miles"), "yd": (0.9144, "yard,yards"), "ft": (0.3048, "foot,feet"),
               "in": (0.0254, "inch,inches")},
    "mass": {"kg": (1.0, "kilogram,kilograms"), "g": (0.001, "gram,grams"),
             "mg": (1e-6, "milligram,milligrams"),
             "lb": (0.45359237, "lbs,pound,pounds"), "oz": (0.028349523125, "ounce,ounces"),
             "t": (1000.0, "tonne,tonnes")},
    "volume": {"l": (1.0, "liter,liters,litre,litres"), "ml": (0.001, "milliliter,milliliters"),
               "m3": (1000.0, "cubic meter,cubic meters"), "gal": (3.785411784, "gallon,gallons"),
               "cup": (0.2365882365, "cups"), "floz": (0.0295735295625, "fl oz,fluid ounce,fluid ounces")},
    "time": {"s": (1.0, "sec,second,seconds"), "ms": (0.001, "millisecond,milliseconds"),
             "min": (60.0, "minute,minutes"), "h": (3600.0, "hr,hour,hours"), "day": (86400.0, "d,days"),
             "week": (604800.0, "wk,weeks")},
    "temperature": {"C": (None, "celsius,°c,degrees celsius,degree celsius"),
                    "F": (None, "fahrenheit,°f,degrees fahrenheit,degree fahrenheit"), "K": (None, "kelvin,kelvins")},
}
_UNIT_INDEX = {alias.lower(): (dim, unit) for dim, table in _UNITS.items()
               for unit, (_, aliases) in table.items() for alias in [unit, *aliases.split(",")]}
_TO_KELVIN = {"C": lambda v: v + 273.15, "F": lambda v: (v - 32) * 5 / 9 + 273.15, "K": lambda v: v}
_FROM_KELVIN = {"C": lambda k: k - 273.15, "F": lambda k: (k - 273.15) * 9 / 5 + 32, "K": lambda k: k}


def unit_spellings() -> dict[str, dict[str, tuple[str, ...]]]:
    """Every spelling `convert_units` accepts: {dimension: {canonical unit: (canonical, *aliases)}}."""
    return {dim: {unit: (unit, *aliases.split(",")) for unit, (_, aliases) in table.items()}
            for dim, table in _UNITS.items()}


def _unit(name: str) -> tuple[str, str]:
    found = _UNIT_INDEX.get(name.strip().lower())
    if found is None:
        known = ", ".join(u for table in _UNITS.values() for u in table)
        raise ToolError(f"unknown unit '{name}'; known: {known}")
    return found


def convert(value: float, from_unit: str, to_unit: str) -> tuple[float, str]:
    """(value in to_unit to 6 significant digits, canonical to_unit)."""
    (dim_a, a), (dim_b, b) = _unit(from_unit), _unit(to_unit)
    if dim_a != dim_b:
        raise ToolError(f"cannot convert {a} ({dim_a}) to {b} ({dim_b})")
    if dim_a == "temperature":
        kelvin = _TO_KELVIN[a](value)
        if kelvin < 0:
            raise ToolError("temperature below absolute zero")
        result = _FROM_KELVIN[b](kelvin)
    else:
        result = value * _UNITS[dim_a][a][0] / _UNITS[dim_a][b][0]
    return _number(result, 6), b


# ---- builtin tools: facts ------------------------------------------------------------------------

def _rows(fields: str, data: str) -> dict[str, dict]:
    """Rows from 'Key|v1|v2' entries, separated by ';' or newlines; numeric strings become numbers."""
    names = fields.split()
    table = {}
    for entry in re.split(r"[;\n]", data.strip()):
        key, *values = entry.strip().split("|")
        table[key] = {n: json.loads(v) if re.fullmatch(r"-?\d+(\.\d+)?", v) else v
                      for n, v in zip(names, values)}
    return table


TABLES = {
    "countries": _rows("capital continent currency", """
Argentina|Buenos Aires|South America|ARS; Australia|Canberra|Oceania|AUD; Austria|Vienna|Europe|EUR
Belgium|Brussels|Europe|EUR; Brazil|Brasilia|South America|BRL; Canada|Ottawa|North America|CAD
Chile|Santiago|South America|CLP; China|Beijing|Asia|CNY; Colombia|Bogota|South America|COP
Czechia|Prague|Europe|CZK; Denmark|Copenhagen|Europe|DKK; Egypt|Cairo|Africa|EGP
Ethiopia|Addis Ababa|Africa|ETB; Finland|Helsinki|Europe|EUR; France|Paris|Europe|EUR
Germany|Berlin|Europe|EUR; Ghana|Accra|Africa|GHS; Greece|Athens|Europe|EUR
Hungary|Budapest|Europe|HUF; India|New Delhi|Asia|INR; Ireland|Dublin|Europe|EUR
Italy|Rome|Europe|EUR; Japan|Tokyo|Asia|JPY; Kenya|Nairobi|Africa|KES
Mexico|Mexico City|North America|MXN; Morocco|Rabat|Africa|MAD; Netherlands|Amsterdam|Europe|EUR
New Zealand|Wellington|Oceania|NZD; Nigeria|Abuja|Africa|NGN; Norway|Oslo|Europe|NOK
Peru|Lima|South America|PEN; Poland|Warsaw|Europe|PLN; Portugal|Lisbon|Europe|EUR
South Korea|Seoul|Asia|KRW; Spain|Madrid|Europe|EUR; Sweden|Stockholm|Europe|SEK
Switzerland|Bern|Europe|CHF; Thailand|Bangkok|Asia|THB; United Kingdom|London|Europe|GBP
United States|Washington, D.C.|North America|USD; Vietnam|Hanoi|Asia|VND
"""),
    # Standard atomic weights (IUPAC, abridged).
    "elements": _rows("symbol number mass", """
hydrogen|H|1|1.008; helium|He|2|4.0026; lithium|Li|3|6.94; beryllium|Be|4|9.0122; boron|B|5|10.81
carbon|C|6|12.011; nitrogen|N|7|14.007; oxygen|O|8|15.999; fluorine|F|9|18.998; neon|Ne|10|20.18
sodium|Na|11|22.99; magnesium|Mg|12|24.305; aluminium|Al|13|26.982; silicon|Si|14|28.085
phosphorus|P|15|30.974; sulfur|S|16|32.06; chlorine|Cl|17|35.45; argon|Ar|18|39.95; potassium|K|19|39.098
calcium|Ca|20|40.078; titanium|Ti|22|47.867; chromium|Cr|24|51.996; manganese|Mn|25|54.938
iron|Fe|26|55.845; cobalt|Co|27|58.933; nickel|Ni|28|58.693; copper|Cu|29|63.546; zinc|Zn|30|65.38
bromine|Br|35|79.904; silver|Ag|47|107.87; tin|Sn|50|118.71; iodine|I|53|126.9; platinum|Pt|78|195.08
gold|Au|79|196.97; mercury|Hg|80|200.59; lead|Pb|82|207.2; uranium|U|92|238.03
"""),
    # Order from the Sun and mean radius (NASA planetary fact sheets).
    "planets": _rows("order radius_km", """
Mercury|1|2439.7; Venus|2|6051.8; Earth|3|6371; Mars|4|3389.5
Jupiter|5|69911; Saturn|6|58232; Uranus|7|25362; Neptune|8|24622
"""),
}


def lookup_row(table: str, key: str) -> dict:
    rows = TABLES.get(table)
    if rows is None:
        raise ToolError(f"unknown table '{table}'; tables: {', '.join(TABLES)}")
    wanted = key.strip().lower()
    for name, row in rows.items():
        if wanted == name.lower() or (table == "elements" and wanted == row["symbol"].lower()):
            return dict(row)  # a copy: the tables stay read-only
    raise ToolError(f"no key '{key}' in {table}; e.g. {', '.join(list(rows)[:3])}")


# ---- builtin tools: dates, time, key-value store -------------------------------------------------

_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_OFFSET = re.compile(r"^(?:UTC|GMT)?([+-])(\d{1,2})(?::?(\d{2}))?$")


def parse_date(text: str) -> dt.date:
    try:
        if not _ISO_DATE.match(text.strip()):
            raise ValueError
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ToolError(f"'{text}' is not a date like 2024-03-15") from None


def parse_timezone(name: str) -> dt.timezone:
    """UTC (also 'Z', 'GMT') or a fixed offset like '+05:30', 'UTC-8'; no named zones (no tz database)."""
    text = name.strip().upper()
    if text in ("UTC", "Z", "GMT", ""):
        return dt.timezone.utc
    m = _OFFSET.match(text)
    if m:
        hours, minutes = int(m.group(2)), int(m.group(3) or 0)
        if hours <= 14 and minutes < 60:
            sign = 1 if m.group(1) == "+" else -1
            return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
    raise ToolError(f"unknown timezone '{name}'; use UTC or an offset like +05:30")


class KVStore:
    """A bounded in-memory string store; thread-safe because a timed-out tool may still be running."""

    def __init__(self, max_keys: int = 100, max_key_chars: int = 64, max_value_chars: int = 500):
        self.max_keys, self.max_key_chars, self.max_value_chars = max_keys, max_key_chars, max_value_chars
        self._data: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, key: str, value: str) -> None:
        if not key.strip():
            raise ToolError("key must not be empty")
        if len(key) > self.max_key_chars:
            raise ToolError(f"key longer than {self.max_key_chars} characters")
        if len(value) > self.max_value_chars:
            raise ToolError(f"value longer than {self.max_value_chars} characters")
        with self._lock:
            if key not in self._data and len(self._data) >= self.max_keys:
                raise ToolError(f"store is full ({self.max_keys} keys)")
            self._data[key] = value

    def get(self, key: str) -> str:
        with self._lock:
            if key not in self._data:
                keys = ", ".join(sorted(self._data)) or "(none)"
                raise ToolError(f"no key '{key}'; keys: {keys}")
            return self._data[key]

    def keys(self) -> list[str]:
        with self._lock:
            return sorted(self._data)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def builtin_tools(clock: Callable[[], dt.datetime] | None = None,
                  store: KVStore | None = None) -> ToolRegistry:
    """The demo tools; `clock` (returning an aware or UTC-naive datetime) and `store` are injectable."""
    clock = clock or _utc_now
    store = store if store is not None else KVStore()
    reg = ToolRegistry()

    @reg.register
    def calculator(expression: str) -> dict:
        """Evaluate arithmetic."""
        return {"result": evaluate(expression)}

    @reg.register
    def convert_units(value: float, from_unit: str, to_unit: str) -> dict:
        """Convert units."""
        result, unit = convert(value, from_unit, to_unit)
        return {"result": result, "unit": unit}

    @reg.register
    def lookup(table: Literal["countries", "elements", "planets"], key: str) -> dict:
        """Look up facts."""
        return lookup_row(table, key)

    @reg.register
    def date_add(date: str, days: int) -> dict:
        """Add days to a YYYY-MM-DD date."""
        try:
            return {"result": (parse_date(date) + dt.timedelta(days=days)).isoformat()}
        except OverflowError:
            raise ToolError("date out of range") from None

    @reg.register
    def date_diff(start: str, end: str) -> dict:
        """Days from start to end (YYYY-MM-DD)."""
        return {"result": (parse_date(end) - parse_date(start)).days}

    @reg.register
    def current_time(timezone: str = "UTC") -> dict:
        """Current time.

        Args:
            timezone: UTC or +05:30
        """
        tz = parse_timezone(timezone)
        now = clock()
        now = now if now.tzinfo else now.replace(tzinfo=dt.timezone.utc)
        return {"result": now.astimezone(tz).replace(microsecond=0).isoformat()}

    @reg.register
    def kv_set(key: str, value: str) -> dict:
        """Save a value."""
        store.set(key, value)
        return {"result": "ok"}

    @reg.register
    def kv_get(key: str) -> dict:
        """Read a saved value."""
        return {"result": store.get(key)}

    @reg.register
    def kv_list() -> dict:
        """List saved keys."""
        return {"result": store.keys()}

    return reg
