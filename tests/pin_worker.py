"""Pinning worker for tests/test_pins_race.py: a real process that pins checkpoints while another process removes
them, through the same code as `ckptkeeper pin` (`pinning.find_target`, `pinning.pin`).

    python tests/pin_worker.py

Reads one JSON command per line on stdin: {"pins": [[delay_seconds, checkpoint_path], ...], "root": ROOT,
"state": STATE_DIR}. For each, in order, it sleeps until `delay_seconds` after the command arrived and pins the
checkpoint (no lease), then answers one line per checkpoint:

    PINNED <path> <json list of its top-level entries, listed right after the pin succeeded>
    REFUSED <path> <message>      (a removal under way, or it is gone)
    PROBLEM <path> <message>      (not there any more when looked up, and the like)

and "END" after the last one. Or {"chase": JOURNAL, "stop": STOP_FILE, "root": ROOT, "state": STATE_DIR}: until
STOP_FILE exists, it follows the journal and pins each checkpoint the moment its `start-*` line appears (the
engine writes it once the removal is under way, so such a pin must fail), answering as above. Imports are paid
once, at start ("READY").
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from ckptkeeper.pinning import PinProblem, PinRefused, find_target, pin


def emit(line: str) -> None:
    os.write(1, (line + "\n").encode())


def pin_one(path: str, root: Path, state: Path) -> str:
    try:
        target = find_target(Path(path), root, state)
        pin(target, "race")
    except PinRefused as e:
        return f"REFUSED {path} {e}"
    except PinProblem as e:
        return f"PROBLEM {path} {e}"
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:  # pinned, then gone: the very failure the race test looks for
        entries = [f"<gone: {e}>"]
    return f"PINNED {path} {json.dumps(entries)}"


def chase(journal: Path, stop: Path, root: Path, state: Path) -> None:
    """Pin each checkpoint whose removal the journal says has started, as soon as it says so."""
    seen = 0
    while True:
        stopping = stop.exists()  # read the journal once more after the stop: its last lines count too
        try:
            lines = journal.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines[seen:]:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if str(entry.get("action", "")).startswith("start-"):
                    run, name = str(entry["run"]), str(entry["checkpoint"])
                    emit(pin_one(str(root / name if run == "." else root / run / name), root, state))
        seen = max(seen, len(lines))
        if stopping:
            return
        time.sleep(0.001)


def main() -> int:
    emit("READY")
    for line in sys.stdin:
        command = json.loads(line)
        started = time.monotonic()
        root, state = Path(command["root"]), Path(command["state"])
        if "chase" in command:
            chase(Path(command["chase"]), Path(command["stop"]), root, state)
            emit("END")
            continue
        for delay, path in command["pins"]:
            pause = started + float(delay) - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            emit(pin_one(path, root, state))
        emit("END")
    return 0


if __name__ == "__main__":
    sys.exit(main())
