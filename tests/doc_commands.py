"""The shell commands that README.md and docs/*.md show, as a reader would copy them.

A command is a line of a fenced block tagged bash, sh, shell or console (a line ending in `\\`
continues on the next; `#` comments are dropped), or a line starting with `$ ` in any other fenced
block, whose following lines, up to the next `$ `, are its output as the page shows it.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHELL_LANGS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
TRAILING_COMMENT = re.compile(r"\s{2,}#\s.*$")  # aligned comments after a command, as the docs write them


@dataclasses.dataclass(frozen=True)
class Command:
    page: str  # path relative to the repository
    line: int  # of the command's first line
    text: str  # continuation lines joined with single spaces, trailing comment dropped
    shown: tuple[str, ...] = ()  # output lines shown after a `$ ` command

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shell_block(page: str, first_line: int, body: str) -> list[Command]:
    commands, pending, start = [], [], 0
    for i, line in enumerate(body.splitlines()):
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = first_line + i
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(TRAILING_COMMENT.sub("", stripped))
        commands.append(Command(page, start, " ".join(pending)))
        pending = []
    return commands


def _dollar_lines(page: str, first_line: int, body: str) -> list[Command]:
    commands, current = [], None
    for i, line in enumerate(body.splitlines()):
        if line.startswith("$ "):
            if current is not None:
                commands.append(current)
            current = Command(page, first_line + i, line[2:].strip())
        elif current is not None:
            current = dataclasses.replace(current, shown=(*current.shown, line))
    if current is not None:
        commands.append(current)
    return commands


def doc_commands() -> list[Command]:
    found = []
    for path in pages():
        text = path.read_text(encoding="utf-8")
        page = str(path.relative_to(ROOT))
        for fence in FENCE.finditer(text):
            lang, body = fence.groups()
            first_line = text.count("\n", 0, fence.start(2)) + 1
            if lang in SHELL_LANGS:
                found += _shell_block(page, first_line, body)
            else:
                found += _dollar_lines(page, first_line, body)
    return found


def output_block_after(page: str, line: int) -> list[str]:
    """The lines of the first untagged fenced block after `line` of `page` (an example's output)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    for fence in FENCE.finditer(text):
        if text.count("\n", 0, fence.start()) + 1 > line and fence.group(1) == "":
            return fence.group(2).splitlines()
    raise AssertionError(f"{page}: no output block after line {line}")
