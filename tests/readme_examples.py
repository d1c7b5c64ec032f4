"""The README's examples as data: each fenced block that shows commands (`$ ckptkeeper ...`) or a log, the
scenario it was made in (an `<!-- example: NAME -->` comment right above it), and how its text is compared
with what the command prints now.

Matching: every line is compared after `normalize` (times of day, the demo's temporary directory, how long
a stale checkpoint has been unchanged). A line
`...` stands for any number of lines; a line ending in `...` for any line that starts with what precedes
it. Command blocks match line for line; blocks of log lines (`log` flag, and every `watch` command, whose
timing varies) are excerpts: their lines must appear in order, other lines may come between them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FENCE = re.compile(r"^(\s*)```(\w*)\s*$")
TAG = re.compile(r"^\s*<!-- example: (?P<name>[\w-]+)(?P<flags>(?: [\w-]+)*) -->\s*$")
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")
DEMO_DIR = re.compile(r"/tmp/ckptkeeper-demo-\w+")
UNCHANGED_FOR = re.compile(r"unchanged for \d+[dhms](\d+[hms])?:")  # how long a stale checkpoint sat
ELLIPSIS = "..."


@dataclass(frozen=True)
class Command:
    line: str  # what follows `$ `
    expected: tuple[str, ...]  # the lines shown after it, up to the next command


@dataclass(frozen=True)
class Block:
    name: str  # the scenario
    flags: frozenset[str]
    start: int  # 1-based line of the opening fence
    commands: tuple[Command, ...] = ()
    log: tuple[str, ...] = ()  # a block of log lines (no command): an excerpt
    text: str = field(default="", compare=False)

    @property
    def where(self) -> str:
        return f"README.md line {self.start} (example {self.name!r})"


def blocks(readme: str) -> tuple[list[Block], list[int]]:
    """The tagged blocks, and the lines of untagged blocks that show a `$ ckptkeeper` command or a log."""
    lines = readme.splitlines()
    found: list[Block] = []
    untagged: list[int] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent = len(fence.group(1))
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        body = [line[indent:] for line in lines[i + 1 : end]]
        tag = TAG.match(lines[i - 1]) if i > 0 else None
        if tag:
            found.append(_block(tag.group("name"), tag.group("flags").split(), i + 1, body))
        elif body and (_is_command(body[0]) or TIME.match(body[0])) and fence.group(2) == "":
            untagged.append(i + 1)
        i = end + 1
    return found, untagged


def _is_command(line: str) -> bool:
    return line.startswith("$ ") and "ckptkeeper" in line.split("#", maxsplit=1)[0]


def _block(name: str, flags: Sequence[str], start: int, body: list[str]) -> Block:
    text = "\n".join(body)
    if not _is_command(body[0]):
        return Block(name, frozenset(flags), start, log=tuple(body), text=text)
    commands: list[Command] = []
    single = "single" in flags  # the first line is the command; later `$ ` lines are what it prints
    current: str | None = None
    expected: list[str] = []
    for line in body:
        if line.startswith("$ ") and (current is None or not single):
            if current is not None:
                commands.append(Command(current, tuple(_trim(expected))))
            current, expected = line[2:], []
        else:
            expected.append(line)
    assert current is not None
    commands.append(Command(current, tuple(_trim(expected))))
    return Block(name, frozenset(flags), start, tuple(commands), text=text)


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def normalize(text: str) -> list[str]:
    text = DEMO_DIR.sub("/tmp/ckptkeeper-demo-X", TIME.sub("<time>", text))
    text = UNCHANGED_FOR.sub("unchanged for <duration>:", text)
    return [line.rstrip() for line in _trim(text.splitlines())]


def mismatch(expected: Sequence[str], actual: Sequence[str], excerpt: bool) -> str | None:
    """None when `actual` shows `expected` (see the module's docstring); else what differs."""
    want = normalize("\n".join(expected))
    got = normalize("\n".join(actual))
    ok = _excerpt(want, got) if excerpt else _full(want, got)
    if ok:
        return None
    return "expected (README):\n" + "\n".join(want) + "\n\nactual (the command now):\n" + "\n".join(got)


def _full(want: list[str], got: list[str]) -> bool:
    """Line for line, `...` matching any run of lines (greedy with backtracking, as a glob)."""
    if not want:
        return not got
    if want[0] == ELLIPSIS:
        return any(_full(want[1:], got[k:]) for k in range(len(got) + 1))
    return bool(got) and _same(want[0], got[0]) and _full(want[1:], got[1:])


def _same(want: str, got: str) -> bool:
    """A line equal to the README's, or starting with it where the README's line ends in `...`."""
    if want.endswith(ELLIPSIS) and want != ELLIPSIS:
        return got.startswith(want.removesuffix(ELLIPSIS))
    return got == want


def _excerpt(want: list[str], got: list[str]) -> bool:
    at = 0
    for line in (w for w in want if w != ELLIPSIS):
        while at < len(got) and not _same(line, got[at]):
            at += 1
        if at == len(got):
            return False
        at += 1
    return True


def readme(project: Path) -> str:
    return (project / "README.md").read_text(encoding="utf-8")
