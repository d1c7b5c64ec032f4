"""`ckptkeeper pin`, `unpin` and `pins`: thin click commands over `pinning.py` (and `pins.py`, the store).

Registered in cli.py (`PIN_COMMANDS`). Imports nothing heavy at module level: the CLI's start-up time matters.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ckptkeeper.pinning import Target
    from ckptkeeper.pins import PinsFile, StoredPin

EXIT_FAILED = 1
EXIT_USAGE = 2


class PinFailed(click.ClickException):
    """Nothing was pinned (a removal under way, the checkpoint gone, the pins file unusable)."""

    exit_code = EXIT_FAILED


class PinUsage(click.ClickException):
    exit_code = EXIT_USAGE


def _where_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="The state directory of the root (default: ROOT/_ckptkeeper, or the nearest _ckptkeeper above "
        "the checkpoint).",
    )(command)
    return click.option(
        "--root",
        type=click.Path(path_type=Path, file_okay=False),
        help="The root whose run holds the checkpoint (default: CKPTKEEPER_ROOT, else the directory of the "
        "nearest _ckptkeeper above the checkpoint).",
    )(command)


@contextmanager
def _errors() -> Iterator[None]:
    from ckptkeeper.layout import LayoutError
    from ckptkeeper.pinning import PinProblem, PinRefused
    from ckptkeeper.pins import PinsError

    try:
        yield
    except (PinProblem, LayoutError) as e:
        raise PinUsage(str(e)) from None
    except (PinRefused, PinsError) as e:
        raise PinFailed(str(e)) from None


def _settings(root: Path | None, state_dir: Path | None) -> tuple[Path | None, Path | None]:
    """ROOT and the state directory, from the flags, else the environment (and $CKPTKEEPER_CONFIG's file)."""
    from ckptkeeper.cli import _settings as settings_of

    settings = settings_of({"root": root, "state_dir": state_dir})
    return settings.root, settings.state_dir


def _target(checkpoint: Path, root: Path | None, state_dir: Path | None, must_exist: bool) -> Target:
    from ckptkeeper.pinning import find_target

    root, state_dir = _settings(root, state_dir)
    with _errors():
        return find_target(checkpoint, root, state_dir, must_exist)


def when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _lease(expires_at: float | None, now: float) -> str:
    from ckptkeeper.units import human_duration

    if expires_at is None:
        return "until unpinned"
    if expires_at <= now:
        return f"lapsed at {when(expires_at)}"
    return f"until {when(expires_at)} ({human_duration(expires_at - now)} left)"


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--for", "lease", metavar="DURATION", help="A lease: lapses by itself after DURATION (90s, 15m, 2h, 1d).")
@click.option("--note", default="", metavar="TEXT", help="Why it is pinned (shown in plan and pins).")
@_where_options
def pin(checkpoint: Path, lease: str | None, note: str, root: Path | None, state_dir: Path | None) -> None:
    """Keep CHECKPOINT whatever the rules say, until unpinned or its lease (--for) lapses.

    Exits 0 only once the pin is on disk: from then on no ckptkeeper removes, archives or slims it. Fails when
    a removal of it is already under way.

    \b
    Example:
        ckptkeeper pin outputs/exp1/checkpoint-240 --note "figure 3"
        ckptkeeper pin --for 2h CKPT && lm_eval --model hf --model_args pretrained=CKPT ... ; ckptkeeper unpin CKPT
    """
    from ckptkeeper.pinning import PinProblem, parse_lease
    from ckptkeeper.pinning import pin as pin_it

    try:
        seconds = parse_lease(lease)
    except PinProblem as e:
        raise click.BadParameter(str(e), param_hint="'--for'") from None
    target = _target(checkpoint, root, state_dir, must_exist=True)
    with _errors():
        stored = pin_it(target, note, seconds)
    said = f': "{note}"' if note else ""
    expires = stored.pin.expires_at
    lease_text = "until unpinned" if expires is None or lease is None else f"for {lease} (until {when(expires)})"
    click.echo(f"pinned {target.shown} {lease_text}{said}")


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@_where_options
def unpin(checkpoint: Path, root: Path | None, state_dir: Path | None) -> None:
    """Let go of every pin of CHECKPOINT: the rules judge it again (it may be removed at the next pass).

    \b
    Example:
        ckptkeeper unpin outputs/exp1/checkpoint-240
    """
    from ckptkeeper.pinning import unpin as unpin_it

    target = _target(checkpoint, root, state_dir, must_exist=False)
    with _errors():
        removed = unpin_it(target)
    click.echo(f"unpinned {target.shown}" if removed else f"{target.shown} was not pinned; nothing to do")


@click.command("pins")
@click.argument("root", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), help="Default: ROOT/_ckptkeeper")
@click.option("--json", "as_json", is_flag=True, help="Print the pins as JSON for scripts.")
def list_pins(root: Path | None, state_dir: Path | None, as_json: bool) -> None:
    """List the pins of ROOT: note, when pinned, the lease's end, whether the checkpoint is still there.

    Reads the state directory; changes nothing.

    \b
    Example:
        ckptkeeper pins ./outputs
    """
    import os

    from ckptkeeper.cli import _root
    from ckptkeeper.cli import _settings as settings_of
    from ckptkeeper.layout import default_state_dir
    from ckptkeeper.pins import read_file

    settings = settings_of({"root": root, "state_dir": state_dir})
    top = Path(os.path.realpath(_root(settings, config="the $CKPTKEEPER_CONFIG file")))
    if not top.is_dir():
        raise PinUsage(f"root {top} is not a directory")
    state = settings.state_dir or default_state_dir(top)
    with _errors():
        found = read_file(state)
    now = time.time()
    if as_json:
        click.echo(json.dumps(pins_json(top, state, found, now), indent=2))
    else:
        click.echo(pins_text(top, state, found, now))


def _rows(top: Path, found: PinsFile, now: float) -> list[tuple[StoredPin, bool]]:
    from ckptkeeper.pinning import present

    ordered = sorted(found.pins, key=lambda s: (s.pin.run, s.pin.checkpoint, s.pin.pinned_at))
    return [(s, present(top, s.pin.run, s.pin.checkpoint) is not None) for s in ordered]


def pins_text(top: Path, state: Path, found: PinsFile, now: float) -> str:
    from ckptkeeper.render import shown

    head = f"Pins of {top} (in {state})"
    rows = _rows(top, found, now)
    if not rows:
        return f"{head}: none"
    table = [("RUN", "CHECKPOINT", "PINNED", "LEASE", "PRESENT", "NOTE")]
    for s, there in rows:
        run = top.name if s.pin.run == "." else s.pin.run
        lease = _lease(s.pin.expires_at, now)
        there_text = "yes" if there else "gone"
        table.append((shown(run), s.pin.checkpoint, when(s.pin.pinned_at), lease, there_text, s.pin.note))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1] for row in table]
    return "\n".join([head, *(line.rstrip() for line in lines)])


def pins_json(top: Path, state: Path, found: PinsFile, now: float) -> dict[str, Any]:
    return {
        "root": str(top),
        "state_dir": str(state),
        "pins": [
            {
                "run": s.pin.run,
                "checkpoint": s.pin.checkpoint,
                "id": s.id,
                "note": s.pin.note,
                "pinned_at": s.pin.pinned_at,
                "expires_at": s.pin.expires_at,
                "left_seconds": None if s.pin.expires_at is None else max(0.0, s.pin.expires_at - now),
                "lapsed": not s.pin.holds_at(now),
                "present": there,
            }
            for s, there in _rows(top, found, now)
        ],
    }


PIN_COMMANDS = (pin, unpin, list_pins)
