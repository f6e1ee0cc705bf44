"""docs/k2-format.md: every section the code cites exists, and the facts it restates match the code.

Code comments cite the format document by section ("docs/k2-format.md §4.6", or a bare "§7.4.4" in
the parser). Those numbers only help a reader if the headings exist, and the tables and rendered
prompts in the document only help if they stay what the code does.
"""

import json
import re
from pathlib import Path

from kimi_jax.chat import render_chat
from kimi_jax.chat.tokenizer import K2_SPECIAL_TOKENS, PAT_STR
from kimi_jax.config import K2_THINKING, Int4Quant

ROOT = Path(__file__).resolve().parent.parent
FORMAT_DOC = ROOT / "docs" / "k2-format.md"
# Where section references may appear: the code, its templates, and the prose that points into the doc.
CITING = [*(ROOT / d for d in ("kimi_jax", "kernels_pallas", "scripts", "tests", "docs")), ROOT / "README.md"]
CITING_SUFFIXES = (".py", ".jinja", ".md")

SECTION_REF = re.compile(r"§(\d+(?:\.\d+)*)")
OLD_SPEC_REF = re.compile(r"\bspec §", re.IGNORECASE)
HEADING = re.compile(r"^(#{2,4}) (\d+(?:\.\d+)*)\.? ", re.MULTILINE)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _doc() -> str:
    return FORMAT_DOC.read_text(encoding="utf-8")


def _citing_lines():
    """(path relative to the repository, line number, text) of every line that could cite the doc."""
    files = []
    for place in CITING:
        files += [place] if place.is_file() else sorted(p for p in place.rglob("*") if p.suffix in CITING_SUFFIXES)
    for path in files:
        if path == Path(__file__).resolve():
            continue  # this file spells out the patterns it looks for
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            yield path.relative_to(ROOT), number, line


def _section(number: str) -> str:
    """The text of section `number`, up to the next heading of the same or a higher level."""
    text = _doc()
    headings = list(HEADING.finditer(text))
    for i, h in enumerate(headings):
        if h.group(2) == number:
            level = len(h.group(1))
            end = next((n.start() for n in headings[i + 1:] if len(n.group(1)) <= level), len(text))
            return text[h.end():end]
    raise AssertionError(f"docs/k2-format.md has no section {number}")


def _table_rows(text: str) -> list[list[str]]:
    """Cells of each markdown table row, with escaped pipes (`\\|`) kept inside their cell."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
            rows.append([c.strip().replace("\\|", "|") for c in cells])
    return rows


def test_section_numbers_of_the_format_doc_are_unique():
    numbers = [h.group(2) for h in HEADING.finditer(_doc())]
    assert len(numbers) == len(set(numbers)), sorted(n for n in numbers if numbers.count(n) > 1)
    assert {"1.1", "3.4", "4.6", "6.2", "7.4.4", "9"} <= set(numbers)


def test_every_cited_section_exists_in_the_format_doc():
    # Every § in the code refers to this document (the project cites no other numbered text).
    headings = {h.group(2) for h in HEADING.finditer(_doc())}
    missing = [f"{path}:{number}: §{ref}" for path, number, line in _citing_lines()
               for ref in SECTION_REF.findall(line) if ref not in headings]
    assert not missing, "sections cited but absent from docs/k2-format.md:\n" + "\n".join(missing)


def test_nothing_cites_the_spec_outside_the_repository():
    stale = [f"{path}:{number}: {line.strip()}" for path, number, line in _citing_lines() if OLD_SPEC_REF.search(line)]
    assert not stale, "cite docs/k2-format.md instead:\n" + "\n".join(stale)


def test_no_page_or_source_points_outside_the_repository():
    # The repository stands alone: the facts its code and docs cite live in docs/.
    files = [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("kimi_jax/**/*.py"), *ROOT.glob("scripts/*.py"),
             *ROOT.glob("kernels_pallas/**/*.py"), *ROOT.glob("notebooks/*.ipynb")]
    outside = [f"{path.relative_to(ROOT)}: {line.strip()}" for path in files
               for line in path.read_text(encoding="utf-8").splitlines()
               if "../shared" in line or "perf-targets.md" in line]
    assert not outside, "\n".join(outside)


def test_config_table_holds_the_k2_thinking_preset():
    preset = K2_THINKING.to_hf()
    table = {}
    for cells in _table_rows(_section("1.1"))[1:]:
        field, value = cells[0].strip("`"), cells[1].strip("`")
        table[field] = json.loads(value)
    wrong = {f: (v, preset[f]) for f, v in table.items() if f in preset and v != preset[f]}
    assert not wrong, f"docs value vs preset: {wrong}"
    assert set(preset) - {"quantization_config"} <= set(table), "fields the preset writes but the table lacks"


def test_quantization_block_is_what_the_preset_writes():
    lang, body = FENCE.search(_section("1.3")).groups()
    assert lang == "json"
    assert json.loads(body) == Int4Quant().to_hf()


def test_special_token_table_matches_the_tokenizer():
    (body,) = [b for _, b in FENCE.findall(_section("5.2"))]
    rows = {(int(m[1]), m[2], m[3] == "true")
            for m in re.finditer(r"^(\d+)\s+(\S+)\s+(true|false)\b", body, re.MULTILINE)}
    assert rows == {(t.k2_id, t.name, t.special) for t in K2_SPECIAL_TOKENS}


def test_pre_tokenizer_regex_is_the_tokenizers():
    body = FENCE.search(_section("5.3")).group(2)
    assert "|".join(body.splitlines()) == PAT_STR


def test_rendered_examples_are_what_the_template_renders():
    blocks = FENCE.findall(_section("6"))
    checked = 0
    for (lang, body), following in zip(blocks, blocks[1:]):
        if lang != "json":
            continue
        example = json.loads(body)
        assert following[0] == "text", f"a rendered ```text block must follow {body[:60]!r}"
        rendered = render_chat(example["messages"], example["tools"],
                               add_generation_prompt=example["add_generation_prompt"])
        assert rendered == following[1].removesuffix("\n")
        checked += 1
    assert checked == 6
