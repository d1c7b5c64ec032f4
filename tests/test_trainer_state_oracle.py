"""A differential test of the hand-written trainer_state.json reader (ckptkeeper.trainer_state) against the
pydantic model it replaced, kept here as the oracle: for every input both must give the same result, the same
TrainerState or the same TrainerStateError message.

The inputs: every JSON file under tests/fixtures and ../shared/fixtures, every trainer_state.json the hostile
corpus writes (tests/test_hostile_corpus.py), and generated variants of a real file: each key the reader uses
given every kind of JSON value (booleans where integers go, NaN and the infinities, integers beyond the float
range, strings, containers, nested junk), each key missing, two keys wrong at once, junk log_history entries
and unknown keys."""

from __future__ import annotations

import itertools
import json
import math
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, field_validator

from ckptkeeper import trainer_state as ts
from ckptkeeper.trainer_state import TrainerState, TrainerStateError, parse_trainer_state

TESTS = Path(__file__).parent
FIXTURE_DIRS = [TESTS / "fixtures", TESTS.parent.parent / "shared" / "fixtures"]
REAL = TESTS / "fixtures" / "hf" / "A" / "checkpoint-78" / "trainer_state.json"
MAX_HARVESTED = 1 << 20  # the corpus's 100 MB and sparse 64 GiB files are left out (no type check in them)


# --- the oracle: the pydantic model and the parse that used it, as they were ------------------------------


class _TrainerStateFile(BaseModel):
    model_config = ConfigDict(extra="ignore")
    global_step: StrictInt | None = None
    epoch: StrictFloat | None = None
    log_history: list[Any] = []
    best_global_step: StrictInt | None = None
    best_model_checkpoint: str | None = None
    stateful_callbacks: dict[str, Any] = {}

    @field_validator("epoch", mode="before")
    @classmethod
    def _epoch_beyond_floats(cls, value: object) -> object:
        return None if type(value) is int and ts._as_float(value) is None else value


def _oracle_best_steps(state: _TrainerStateFile) -> tuple[int, ...]:
    steps = [] if state.best_global_step is None else [state.best_global_step]
    named = ts._named_step(state.best_model_checkpoint)
    if named is not None and named not in steps:
        steps.append(named)
    return tuple(steps)


def oracle(data: bytes) -> TrainerState:
    if not data.strip():
        raise TrainerStateError("trainer_state.json is empty")
    raw = ts._load_json(data)
    if not isinstance(raw, dict):
        raise TrainerStateError(f"trainer_state.json holds a JSON {ts._json_type(raw)}, not an object")
    try:
        state = _TrainerStateFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TrainerStateError(f"trainer_state.json: {where}: {first['msg'].lower()}") from None
    problem = ts._history_problem(state.log_history)
    if problem:
        raise TrainerStateError(problem)
    epoch = None if state.epoch is None else float(state.epoch)
    if epoch is not None and not math.isfinite(epoch):
        epoch = None
    return TrainerState(
        global_step=state.global_step,
        epoch=epoch,
        best_steps=_oracle_best_steps(state),
        training_stopped=ts._training_stopped(state.stateful_callbacks),
        log_history=tuple(state.log_history),
    )


# --- the comparison --------------------------------------------------------------------------------------------


def outcome(parse: Any, data: bytes) -> tuple[str, ...]:
    """What a parse gives, comparable: the error's message, or every field (repr: NaN is NaN, -0.0 not 0.0)."""
    try:
        state = parse(data)
    except TrainerStateError as e:
        return ("refused", str(e))
    assert isinstance(state, TrainerState)
    fields = (state.global_step, state.epoch, state.best_steps, state.training_stopped, state.log_history)
    return ("read", *map(repr, fields), repr([type(v) for v in fields[:2]]))


def assert_same(data: bytes) -> tuple[str, ...]:
    expected = outcome(oracle, data)
    assert outcome(parse_trainer_state, data) == expected, data[:300]
    return expected


# --- the inputs ------------------------------------------------------------------------------------------------


def fixture_files() -> list[Path]:
    return sorted(p for d in FIXTURE_DIRS if d.is_dir() for p in d.rglob("*.json") if p.is_file())


def test_every_fixture_file_reads_the_same() -> None:
    files = fixture_files()
    assert len(files) > 100  # the project's own: 119 (../shared/fixtures adds more where it is there)
    outcomes = [assert_same(p.read_bytes()) for p in files]
    assert sum(p.name == ts.TRAINER_STATE for p in files) > 30  # the project's own: 38
    assert "read" in {o[0] for o in outcomes}


def harvest_corpus(base: Path) -> Iterator[bytes]:
    """Every regular trainer_state.json (up to MAX_HARVESTED bytes) that a hostile corpus case writes."""
    from tests.test_hostile_corpus import CASES

    for number, case in enumerate(CASES):
        place = base / str(number)
        (place / "outside").mkdir(parents=True)
        try:
            case.build(place / "root")
        except (Exception, pytest.skip.Exception):  # a case that needs what this machine lacks (root, mknod)
            continue
        for depth in range(1, 4):  # the checkpoints' own (a deeper tree can be longer than a path may be)
            for path in (place / "root").glob("*/" * depth + ts.TRAINER_STATE):
                info = path.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_size <= MAX_HARVESTED:
                    yield path.read_bytes()


def test_every_trainer_state_of_the_hostile_corpus_reads_the_same(tmp_path: Path) -> None:
    files = set(harvest_corpus(tmp_path))
    assert len(files) > 30
    outcomes = [assert_same(data) for data in files]
    assert {o[0] for o in outcomes} == {"read", "refused"}


# Raw JSON texts of every kind, spliced in as a key's value.
VALUES = [
    "null", "true", "false", "0", "-0", "1", "-1", "78", "52", "-7", "10" + "0" * 30, "1" + "0" * 400,
    "1" + "0" * 4300, "0.0", "-0.0", "1.0", "78.0", "1.5", "3e2", "1e999", "-1e999", "1e-999", "NaN",
    "Infinity", "-Infinity", '""', '"78"', '"1.0"', '"checkpoint-52"', '"out/checkpoint-78/"', '"\\ud800"',
    '"a\\u0000b"', "[]", "[78]", '[{"step": 10}]', "[null]", '[{"step": 10}, 7]', '[[{"step": 10}]]', "{}",
    '{"step": 10}', '{"TrainerControl": {"args": {"should_training_stop": true}}}',
    '{"TrainerControl": {"args": {"should_training_stop": 1}}}', '{"TrainerControl": []}', "[[[[[]]]]]",
    '{"a": {"b": {"c": [NaN, Infinity, {"d": null}]}}}',
]  # fmt: skip
KEYS = ["global_step", "epoch", "log_history", "best_global_step", "best_model_checkpoint", "stateful_callbacks"]
HISTORY_ENTRIES = [
    "null", "7", '"x"', "[]", "true", "{}", '{"step": true, "eval_loss": 1}', '{"step": 78, "eval_loss": NaN}',
    '{"step": 78.0, "eval_loss": 0.5}', '{"step": "78", "eval_loss": 0.5}', '{"step": 78, "eval_x": "1"}',
    '{"step": 78, "eval_big": ' + "1" + "0" * 400 + "}", '{"step": 78, "eval_inf": -1e999}',
]  # fmt: skip


def real_members() -> dict[str, str]:
    """The real file's keys, each with its value as JSON text."""
    doc = json.loads(REAL.read_bytes())
    assert set(KEYS) <= set(doc)
    return {key: json.dumps(value) for key, value in doc.items()}


def document(members: dict[str, str]) -> bytes:
    return ("{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in members.items()) + "}").encode()


def test_each_key_given_each_kind_of_value_reads_the_same() -> None:
    members = real_members()
    outcomes = set()
    for key, value in itertools.product([*KEYS, "unknown_key"], VALUES):
        outcomes.add(assert_same(document({**members, key: value}))[0])
        outcomes.add(assert_same(document({key: value}))[0])  # the key alone
    assert outcomes == {"read", "refused"}


def test_two_wrong_keys_give_the_same_first_reason() -> None:
    members = real_members()
    for first, second in itertools.permutations(KEYS, 2):
        for a, b in itertools.product(['"x"', "true", "[1]", "null"], repeat=2):
            changed = {**members, first: a, second: b}
            assert_same(document(changed))
            assert_same(document({second: b, first: a}))  # the order in the file does not choose the reason


def test_missing_keys_read_the_same() -> None:
    members = real_members()
    for count in range(len(KEYS) + 1):
        for gone in itertools.combinations(KEYS, count):
            assert assert_same(document({k: v for k, v in members.items() if k not in gone}))[0] == "read"


def test_junk_log_history_entries_read_the_same() -> None:
    members = real_members()
    for entries in itertools.product(HISTORY_ENTRIES, repeat=2):
        history = '[{"step": 78, "eval_loss": 0.25}, ' + ", ".join(entries) + "]"
        assert_same(document({**members, "log_history": history}))


def test_numbers_at_the_edges_of_the_float_range_read_the_same() -> None:
    edges = [str(2**1024 - 2**971), str(2**1024 - 2**970), "1.7976931348623157e308", "5e-324", "-0", "-0.0"]
    for key, value in itertools.product(["epoch", "global_step", "best_global_step"], edges):
        assert_same(document({key: value}))
        assert_same(document({key: "-" + value.lstrip("-")}))


def test_the_oracle_is_a_real_check() -> None:
    """The oracle refuses what the hand-written reader must refuse: a changed message would be seen."""
    expected = ("refused", "trainer_state.json: epoch: input should be a valid number")
    assert outcome(oracle, b'{"epoch": true}') == expected
    assert outcome(oracle, REAL.read_bytes())[0] == "read"
