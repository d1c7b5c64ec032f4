"""Numbers no reader may crash on (issue #10, defect 5): integers of hundreds and thousands of digits, float
literals beyond the float range, -0, NaN/Infinity tokens, deep nesting and lone surrogates, in
trainer_state.json and in a safetensors index; then the same files through the real CLI and the real daemon.

The decisions (documented in ckptkeeper/trainer_state.py and ckptkeeper/integrity.py):
- an integer of over 4300 digits anywhere makes the file unusable: the checkpoint is incomplete, with the
  reason `trainer_state.json holds a number too long to read (over 4300 digits)`;
- a metric no float can hold (a 401-digit integer) is not a metric: the key is ignored, the file is fine;
- `1e999` is Infinity, as in every JSON reader (the Trainer's json.loads included);
- an epoch no float can hold is no epoch, as NaN and Infinity are;
- global_step and best_global_step are exact integers however long.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_hostile_corpus import checkpoint, encode_state, trainer_state
from watchutil import Watch, steps, wait_until

from ckptkeeper.integrity import index_problem
from ckptkeeper.model import Checkpoint
from ckptkeeper.scan import read_checkpoint
from ckptkeeper.trainer_state import TrainerState, TrainerStateError, parse_trainer_state

TOO_LONG = "trainer_state.json holds a number too long to read (over 4300 digits)"
INDEX = "model.safetensors.index.json"
STEP = 20


def digits(count: int, negative: bool = False) -> str:
    """An integer literal of `count` digits: 10**(count-1)."""
    return ("-" if negative else "") + "1" + "0" * (count - 1)


D401 = digits(401)
D4300 = digits(4300)
D4301 = digits(4301)
D5000 = digits(5000)
LONG_FLOAT = "1" + "0" * 5000 + ".5"  # a float literal: pydantic-core refuses it, json reads Infinity
MAX_FLOAT_INT = str(2**1024 - 2**971)  # the largest integer that converts to a float (sys.float_info.max)
OVER_FLOAT_INT = str(2**1024 - 2**970)  # the smallest that does not: it rounds to 2**1024
SURROGATE = '"\\ud800"'  # a lone surrogate escape: pydantic-core refuses it, so the json module reads the file


def reason(text: str) -> str:
    with pytest.raises(TrainerStateError) as caught:
        parse_trainer_state(text.encode())
    return str(caught.value)


def at_step(**literals: str) -> str:
    """A trainer_state.json whose one log_history entry at STEP holds the given eval_* literals."""
    entry = ", ".join([f'"step": {STEP}', *(f'"{k}": {v}' for k, v in literals.items())])
    return f'{{"global_step": {STEP}, "log_history": [{{{entry}}}]}}'


def same(a: float, b: float) -> bool:
    """Equal as floats are read: NaN equals NaN, and -0.0 is not 0.0."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same_metrics(a: dict[str, float], b: dict[str, float]) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@contextlib.contextmanager
def int_digits_limit(limit: int) -> Iterator[None]:
    before = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        yield
    finally:
        sys.set_int_max_str_digits(before)


# --- metrics -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (D401, None),  # no float holds it: the key is ignored
        (digits(401, negative=True), None),
        (D4300, None),
        (OVER_FLOAT_INT, None),
        (MAX_FLOAT_INT, sys.float_info.max),
        (digits(309), 1e308),
        ("1e999", math.inf),  # a float literal beyond the range is Infinity, in every JSON reader
        ("-1e999", -math.inf),
        ("1E400", math.inf),
        (D401 + "e5", math.inf),
        (D401 + ".0", math.inf),
        (LONG_FLOAT, math.inf),
        ("1e-999", 0.0),
        ("-1e-999", -0.0),
        ("-0", 0.0),
        ("-0.0", -0.0),
        ("0." + "1" * 5000, 0.1111111111111111),
        ("NaN", math.nan),
        ("Infinity", math.inf),
        ("-Infinity", -math.inf),
    ],
)
def test_a_metric_value(literal: str, expected: float | None) -> None:
    for text in (at_step(eval_loss=literal, eval_accuracy="0.75"), at_step(eval_loss=literal, eval_s=SURROGATE)):
        state = parse_trainer_state(text.encode())
        metrics = state.metrics_at(STEP)
        others = {k: v for k, v in metrics.items() if k != "eval_loss"}
        assert others in ({"eval_accuracy": 0.75}, {}), text[:80]
        if expected is None:
            assert "eval_loss" not in metrics
        else:
            assert same(metrics["eval_loss"], expected), (metrics["eval_loss"], expected)
            assert type(metrics["eval_loss"]) is float


def test_an_entry_whose_only_eval_value_is_a_401_digit_integer_is_no_eval() -> None:
    state = parse_trainer_state(at_step(eval_loss=D401).encode())
    assert state.metrics_at(STEP) == {}
    assert state.evals == ()
    both = f'{{"log_history": [{{"step": 10, "eval_loss": 0.5}}, {{"step": 20, "eval_loss": {D401}}}]}}'
    assert parse_trainer_state(both.encode()).evals == ((10, {"eval_loss": 0.5}),)


def test_a_401_digit_value_does_not_replace_an_earlier_eval_at_the_same_step() -> None:
    text = f'{{"log_history": [{{"step": 20, "eval_loss": 0.5}}, {{"step": 20, "eval_loss": {D401}}}]}}'
    assert parse_trainer_state(text.encode()).metrics_at(STEP) == {"eval_loss": 0.5}


# --- integers too long to read ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        f'{{"global_step": {D5000}}}',
        f'{{"global_step": {digits(5000, negative=True)}}}',
        f'{{"epoch": {D5000}}}',
        f'{{"best_global_step": {D5000}}}',
        f'{{"best_metric": {D4301}}}',
        at_step(eval_loss=D5000),
        f'{{"log_history": [{{"step": {D5000}, "eval_loss": 0.5}}]}}',
        f'{{"log_history": [{{"step": 20, "grad_norm": {D5000}}}]}}',
        f'{{"log_history": [[{D5000}]]}}',  # inside an entry that is not even an object
        f'{{"stateful_callbacks": {{"TrainerControl": {{"args": {{"should_training_stop": {D5000}}}}}}}}}',
        f'{{"unknown": {{"deep": [1, 2, {{"x": {D5000}}}]}}}}',
        f'{{"unknown": {"[" * 300}{D5000}{"]" * 300}}}',  # deeper than pydantic-core reads: the json module does
        f'{{"s": {SURROGATE}, "n": {D5000}}}',
        f'{{"s": {SURROGATE}, "n": {digits(4301, negative=True)}}}',
        f"[{D5000}]",
        D5000,
        f'{{"n": {D5000}, "cut": ',  # too long comes before the cut
    ],
)
def test_an_integer_of_over_4300_digits_anywhere_makes_the_file_unusable(text: str) -> None:
    assert reason(text) == TOO_LONG


@pytest.mark.parametrize("tail", ["", f', "s": {SURROGATE}'])  # read by pydantic-core, then by the json module
def test_4300_digits_are_read_4301_are_not(tail: str) -> None:
    state = parse_trainer_state(f'{{"global_step": {D4300}, "best_global_step": -{D4300}{tail}}}'.encode())
    assert state.global_step == 10**4299
    assert state.best_steps == (-(10**4299),)
    assert reason(f'{{"global_step": {D4301}{tail}}}') == TOO_LONG
    assert reason(f'{{"global_step": -{D4301}{tail}}}') == TOO_LONG


@pytest.mark.parametrize("limit", [0, 100_000])
def test_an_interpreter_limit_off_or_raised_still_refuses_over_4300_digits(limit: int) -> None:
    # With the limit off, the json module would convert any length (in quadratic time): the parsers must agree.
    with int_digits_limit(limit):
        assert reason(f'{{"global_step": {D5000}}}') == TOO_LONG
        assert reason(f'{{"global_step": {D5000}, "s": {SURROGATE}}}') == TOO_LONG
        assert parse_trainer_state(f'{{"global_step": {D4300}, "s": {SURROGATE}}}'.encode()).global_step == 10**4299


def test_a_lower_interpreter_limit_is_a_reason_never_a_crash(tmp_path: Path) -> None:
    with int_digits_limit(640):
        # The json module (a lone surrogate sends the file there) refuses what int() refuses, with the reason.
        assert reason(f'{{"global_step": {digits(1000)}, "s": {SURROGATE}}}') == (
            "trainer_state.json holds a number too long to read (over 640 digits)"
        )
        # pydantic-core reads it whatever the limit: the mismatch reason must not convert it to text.
        directory = checkpoint(tmp_path / "run", 40, state=f'{{"global_step": {digits(1000)}}}'.encode())
        c = read_checkpoint(directory, 40)
    assert not c.complete
    assert c.incomplete_reason == "global_step of over 64 digits in trainer_state.json does not match checkpoint-40"


# --- epoch and steps -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        (D401, None),  # no float holds it: no epoch, as Infinity
        (digits(401, negative=True), None),
        (OVER_FLOAT_INT, None),
        ("1e999", None),
        ("-1e999", None),
        (LONG_FLOAT, None),
        ("NaN", None),
        (digits(309), 1e308),
        (MAX_FLOAT_INT, sys.float_info.max),
        ("-0", 0.0),
        ("-0.0", -0.0),
        ("1e-999", 0.0),
    ],
)
def test_an_epoch(literal: str, expected: float | None) -> None:
    for tail in ("", f', "s": {SURROGATE}'):
        state = parse_trainer_state(f'{{"global_step": 5, "epoch": {literal}{tail}}}'.encode())
        assert state.global_step == 5
        if expected is None:
            assert state.epoch is None
        else:
            assert state.epoch is not None
            assert same(state.epoch, expected)
            assert type(state.epoch) is float


def test_long_steps_are_exact_integers() -> None:
    history = f'[{{"step": {D401}, "eval_x": 1}}]'
    text = f'{{"global_step": {D4300}, "best_global_step": {D401}, "log_history": {history}}}'
    state = parse_trainer_state(text.encode())
    assert state.global_step == 10**4299
    assert state.best_steps == (10**400,)
    assert state.metrics_at(10**400) == {"eval_x": 1.0}
    assert state.evals == ((10**400, {"eval_x": 1.0}),)
    minus_zero = parse_trainer_state(b'{"global_step": -0, "log_history": [{"step": -0, "eval_x": 2}]}')
    assert minus_zero.global_step == 0
    assert type(minus_zero.global_step) is int
    assert minus_zero.metrics_at(0) == {"eval_x": 2.0}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("checkpoint-" + "1" * 244, (int("1" * 244),)),  # 255 bytes: still a file name
        ("/out/checkpoint-" + "1" * 244, (int("1" * 244),)),
        ("checkpoint-" + "1" * 245, ()),  # longer than any file name: no checkpoint has it
        ("checkpoint-" + "1" * 5000, ()),  # and int() would raise
        ("checkpoint-\ud800", ()),
    ],
)
def test_a_best_model_checkpoint_with_a_long_step(name: str, expected: tuple[int, ...]) -> None:
    text = '{"best_model_checkpoint": ' + json.dumps(name) + "}"
    assert parse_trainer_state(text.encode()).best_steps == expected


# --- strings, nesting ----------------------------------------------------------------------------------------


def test_lone_surrogates_are_read_as_the_trainers_json_reads_them() -> None:
    text = '{"global_step": 20, "trial_name": "\\udc80", "log_history": [{"step": 20, "eval_\\ud800": 0.5}]}'
    state = parse_trainer_state(text.encode())
    assert state.global_step == 20
    assert state.metrics_at(STEP) == {"eval_\ud800": 0.5}


@pytest.mark.parametrize("depth", [150, 300, 900])  # below pydantic-core's limit, above it, near the json module's
def test_nesting_the_json_module_reads_is_read_whatever_numbers_it_holds(depth: int) -> None:
    nested = "[" * depth + f"{D401}, 1e999, NaN, -0" + "]" * depth
    text = f'{{"global_step": 20, "unknown": {nested}, "log_history": [{{"step": 20, "eval_loss": {D401}}}]}}'
    state = parse_trainer_state(text.encode())
    assert state.global_step == 20
    assert state.metrics_at(STEP) == {}


def test_nesting_too_deep_is_a_reason() -> None:
    assert reason('{"unknown": ' + "[" * 5000 + "]" * 5000 + "}") == "trainer_state.json is nested too deeply"


# --- a real checkpoint directory ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "complete", "why", "metrics", "epoch"),
    [
        (at_step(eval_loss=D401, eval_acc="0.5"), True, None, {"eval_acc": 0.5}, None),
        (at_step(eval_loss="1e999"), True, None, {"eval_loss": math.inf}, None),
        (f'{{"global_step": 20, "epoch": {D401}}}', True, None, {}, None),
        ('{"global_step": 20, "epoch": -0.0}', True, None, {}, -0.0),
        (f'{{"global_step": {D5000}}}', False, TOO_LONG, {}, None),
        (f'{{"global_step": 20, "epoch": {D5000}}}', False, TOO_LONG, {}, None),
        (at_step(eval_x=D5000), False, TOO_LONG, {}, None),
        (
            f'{{"global_step": {D4300}}}',
            False,
            "global_step of over 64 digits in trainer_state.json does not match checkpoint-20",
            {},
            None,
        ),
        (
            f'{{"global_step": {digits(64)}}}',
            False,
            f"global_step {digits(64)} in trainer_state.json does not match checkpoint-20",
            {},
            None,
        ),
    ],
)
def test_read_checkpoint(
    tmp_path: Path, text: str, complete: bool, why: str | None, metrics: dict[str, float], epoch: float | None
) -> None:
    c = read_checkpoint(checkpoint(tmp_path / "run", STEP, state=text.encode()), STEP)
    assert (c.complete, c.incomplete_reason) == (complete, why)
    assert same_metrics(dict(c.metrics), metrics)
    assert c.epoch is None if epoch is None else (c.epoch is not None and same(c.epoch, epoch))


# --- the safetensors index -----------------------------------------------------------------------------------


def _index(tmp_path: Path, text: str) -> str | None:
    (tmp_path / INDEX).write_text(text, encoding="utf-8", errors="surrogatepass")
    return index_problem(tmp_path, tmp_path / INDEX, {"model.safetensors"})


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (D401, None),  # numbers other than weight_map's strings do not matter
        ("1e999", None),
        ("NaN", None),
        ("-0", None),
        (LONG_FLOAT, None),
        (D4300, None),
        (D5000, f"{INDEX} holds a number too long to read (over 4300 digits)"),
        ("-" + D4301, f"{INDEX} holds a number too long to read (over 4300 digits)"),
        ("[" * 5000 + "]" * 5000, f"{INDEX} is not valid JSON"),
    ],
)
def test_numbers_in_an_index(tmp_path: Path, metadata: str, expected: str | None) -> None:
    text = f'{{"metadata": {{"total_size": {metadata}}}, "weight_map": {{"w": "model.safetensors"}}}}'
    assert _index(tmp_path, text) == expected


def test_an_index_with_an_integer_too_long_under_a_lower_interpreter_limit(tmp_path: Path) -> None:
    with int_digits_limit(640):
        text = f'{{"n": {digits(1000)}, "weight_map": {{"w": "model.safetensors"}}}}'
        assert _index(tmp_path, text) == f"{INDEX} holds a number too long to read (over 640 digits)"


@pytest.mark.parametrize(
    ("shard", "shown"),
    [
        ("x.safetensors\n  checkpoint-99  keep", "'x.safetensors\\n  checkpoint-99  keep'"),  # no fake plan row
        ("\ud800.safetensors", "'\\ud800.safetensors'"),
        ("\x00", "'\\x00'"),
    ],
)
def test_a_shard_name_that_is_not_printable_is_shown_escaped(tmp_path: Path, shard: str, shown: str) -> None:
    assert _index(tmp_path, json.dumps({"weight_map": {"w": shard}})) == f"{INDEX} names {shown}, which is missing"


def test_a_long_shard_name_is_shown_cut(tmp_path: Path) -> None:
    problem = _index(tmp_path, json.dumps({"weight_map": {"w": "s" * 100_000}}))
    assert problem == f"{INDEX} names {'s' * 255}..., which is missing"
    outside = _index(tmp_path, json.dumps({"weight_map": {"w": "../" + "s" * 100_000}}))
    assert outside == f"{INDEX} names a shard outside the checkpoint: '../{'s' * 251}..."


# --- properties: any bytes, any JSON-ish document ------------------------------------------------------------

BOUNDED = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _array(items: list[str]) -> str:
    return "[" + ", ".join(items) + "]"


def _object(pairs: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in pairs) + "}"


def _nest(value_depth: tuple[str, int]) -> str:
    value, depth = value_depth
    return "[" * depth + value + "]" * depth


long_ints = st.builds(
    digits, st.sampled_from([309, 310, 401, 4299, 4300, 4301, 5000]) | st.integers(300, 6000), st.booleans()
)
number_tokens = [
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "1e-999",
    "-0",
    "-0.0",
    "1E400",
    LONG_FLOAT,
    "0." + "1" * 5000,
    MAX_FLOAT_INT,
    OVER_FLOAT_INT,
    D401 + "e-500",
]
numbers = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    long_ints,
    st.sampled_from(number_tokens),
)
strings = st.one_of(
    st.text(max_size=12).map(json.dumps),
    st.sampled_from(
        [
            SURROGATE,
            '"\\udfff-x"',
            '"checkpoint-20"',
            '"/out/checkpoint-10"',
            '"checkpoint-' + "1" * 300 + '"',
            '"checkpoint-' + "1" * 5000 + '"',
            '"checkpoint-\\u0663"',
        ]
    ),
)
scalars = numbers | strings | st.sampled_from(["true", "false", "null"])
eval_keys = st.sampled_from(["eval_loss", "eval_accuracy", "eval_\ud800", "eval_", "loss", "epoch"]) | st.text(
    max_size=6
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4).map(_array) | st.lists(st.tuples(eval_keys, inner), max_size=4).map(_object)
    ),
    max_leaves=10,
)
any_value = values | st.tuples(values, st.sampled_from([150, 300, 1500])).map(_nest)
step_values = st.sampled_from([str(STEP), str(STEP), "10", "-0", "20.0", "2e1", "true", '"20"', "null"]) | long_ints
entries = st.builds(
    lambda step, pairs: _object([("step", step), *pairs]),
    step_values,
    st.lists(st.tuples(eval_keys, any_value), max_size=4),
)
histories = st.lists(entries | any_value, max_size=5).map(_array) | any_value
callbacks = any_value.map(
    lambda stop: _object([("TrainerControl", _object([("args", _object([("should_training_stop", stop)]))]))])
)
documents = (
    st.fixed_dictionaries(
        {},
        optional={
            "global_step": step_values | any_value,
            "epoch": numbers | any_value,
            "best_global_step": step_values | any_value,
            "best_model_checkpoint": strings | any_value,
            "best_metric": numbers,
            "log_history": histories,
            "stateful_callbacks": callbacks | any_value,
            "total_flos": numbers,
            "unknown": any_value,
        },
    ).map(lambda d: _object(list(d.items())))
    | any_value
)

VALID = encode_state(trainer_state(STEP, epoch=2.0, loss=0.5))
splices = st.builds(
    lambda at, piece: VALID[:at] + piece.encode() + VALID[at:], st.integers(0, len(VALID)), numbers | strings
)
any_bytes = st.binary(max_size=300) | splices


def _expected_metrics(raw: object) -> dict[str, float]:
    """metrics_at(STEP) as the Trainer's json.loads reads the file, by the documented rule."""
    merged: dict[str, float] = {}
    history = raw.get("log_history") if isinstance(raw, dict) else None
    for entry in history if isinstance(history, list) else []:
        if isinstance(entry, dict) and type(entry.get("step")) is int and entry["step"] == STEP:
            for key, value in entry.items():
                if key.startswith("eval_") and type(value) in (int, float):
                    with contextlib.suppress(OverflowError):  # not a metric: an earlier value stays
                        merged[key] = float(value)
    return merged


def _used(state: TrainerState) -> None:
    """Everything a scan asks of a parsed state, which must not raise either."""
    metrics = state.metrics_at(STEP)
    assert all(type(v) is float for v in metrics.values())
    for step, found in state.evals:
        assert type(step) is int
        assert all(type(v) is float for v in found.values())
    assert state.epoch is None or (type(state.epoch) is float and math.isfinite(state.epoch))
    assert all(type(s) is int for s in state.best_steps)
    assert state.global_step is None or type(state.global_step) is int
    assert type(state.training_stopped) is bool


@BOUNDED
@given(data=any_bytes)
@example(data=at_step(eval_loss=D401).encode())
@example(data=f'{{"x": {D5000}}}'.encode())
def test_any_bytes_are_a_state_or_a_trainer_state_error(data: bytes) -> None:
    try:
        state = parse_trainer_state(data)
    except TrainerStateError as e:
        assert str(e).startswith("trainer_state.json")
        return
    _used(state)


@BOUNDED
@given(text=documents)
@example(text=at_step(eval_loss=D401))
@example(text=at_step(eval_loss=D5000))
@example(text=f'{{"epoch": {D401}}}')
def test_any_document_is_read_as_the_trainers_json_reads_it(text: str) -> None:
    try:
        raw: Any = json.loads(text)  # what the Trainer's TrainerState.load_from_json reads
    except (ValueError, RecursionError):
        raw = None
        trainer_reads = False
    else:
        trainer_reads = True
    try:
        state = parse_trainer_state(text.encode())
    except TrainerStateError:
        return
    assert trainer_reads, "a file the Trainer cannot load counts as usable"
    _used(state)
    assert same_metrics(state.metrics_at(STEP), _expected_metrics(raw))


@pytest.fixture
def one_checkpoint(tmp_path: Path) -> Path:
    return checkpoint(tmp_path / "run", STEP)


@BOUNDED
@given(data=documents.map(str.encode) | any_bytes)
@example(data=at_step(eval_loss=D401).encode())
@example(data=f'{{"global_step": {D4300}}}'.encode())
def test_read_checkpoint_on_any_trainer_state_returns_a_checkpoint(one_checkpoint: Path, data: bytes) -> None:
    (one_checkpoint / "trainer_state.json").write_bytes(data)
    c = read_checkpoint(one_checkpoint, STEP)
    assert isinstance(c, Checkpoint)
    try:
        state = parse_trainer_state(data)
    except TrainerStateError as e:
        assert (c.complete, c.incomplete_reason) == (False, str(e))
    else:
        matches = state.global_step in (None, STEP)
        assert c.complete == matches, c.incomplete_reason
        assert same_metrics(dict(c.metrics), state.metrics_at(STEP))
    reason_text = c.incomplete_reason or ""
    assert len(reason_text) < 200 and "\n" not in reason_text, reason_text


# --- the real CLI and the real daemon ------------------------------------------------------------------------


def state_bytes(step: int, eval_loss: str = "0.5", grad_norm: str = "1.5", stop: bool = False) -> bytes:
    """A trainer_state.json as the Trainer writes it, with the given literals for eval_loss and grad_norm."""
    doc = trainer_state(step, epoch=step / 10, loss=0.777)
    doc["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] = stop
    data = encode_state(doc)
    assert data.count(b'"eval_loss": 0.777') == 1 and data.count(b'"grad_norm": 1.5') == 1
    return data.replace(b'"eval_loss": 0.777', f'"eval_loss": {eval_loss}'.encode()).replace(
        b'"grad_norm": 1.5', f'"grad_norm": {grad_norm}'.encode()
    )


def cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTKEEPER_")}
    env["PYTHONIOENCODING"] = "utf-8"
    done = subprocess.run(
        [sys.executable, "-m", "ckptkeeper", *args], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def test_plan_and_prune_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "root"
    hostile, normal = root / "hostile", root / "normal"
    checkpoint(hostile, 10, state=state_bytes(10, "0.5"))
    checkpoint(hostile, 20, state=state_bytes(20, D401))  # were it +Infinity, best by max would keep it
    checkpoint(hostile, 30, state=state_bytes(30, "0.3"))
    checkpoint(hostile, 40, state=state_bytes(40, "0.1", grad_norm=D5000))
    for step, loss in ((10, "0.2"), (20, "0.6"), (30, "0.4")):
        checkpoint(normal, step, state=state_bytes(step, loss))
    keep = "best:1:loss:max"

    code, out, err = cli("plan", str(root), "--keep", keep, "--json")
    assert code == 0, err
    found = {
        f"{run['run']}/{c['name']}": (c["decision"], c["complete"], c["incomplete_reason"], c["metrics"])
        for run in json.loads(out)["runs"]
        for c in run["checkpoints"]
    }
    runtime = {"eval_runtime": 0.1}
    assert found == {
        "hostile/checkpoint-10": ("keep", True, None, {"eval_loss": 0.5, **runtime}),  # the best
        "hostile/checkpoint-20": ("delete", True, None, runtime),  # no eval_loss: the key is ignored
        "hostile/checkpoint-30": ("keep", True, None, {"eval_loss": 0.3, **runtime}),  # the newest complete
        "hostile/checkpoint-40": ("keep", False, TOO_LONG, {}),
        "normal/checkpoint-10": ("delete", True, None, {"eval_loss": 0.2, **runtime}),
        "normal/checkpoint-20": ("keep", True, None, {"eval_loss": 0.6, **runtime}),
        "normal/checkpoint-30": ("keep", True, None, {"eval_loss": 0.4, **runtime}),
    }
    code, text, err = cli("plan", str(root), "--keep", keep)
    assert code == 0, err
    assert f"incomplete: {TOO_LONG}" in text

    code, out, err = cli("prune", str(root), "--keep", keep)
    assert code == 0, (out, err)
    assert "removed 2 checkpoints" in out
    assert steps(hostile) == [10, 30, 40]
    assert steps(normal) == [20, 30]


def _add(run: Path, step: int, state: bytes) -> None:
    """Write a checkpoint beside the running daemon: built under a hidden name, then renamed into place."""
    staging = checkpoint(run, step, state=state, name=f".staging-{step}")
    os.rename(staging, run / f"checkpoint-{step}")


def test_the_watch_daemon_reads_hostile_numbers_and_prunes_the_run_beside(tmp_path: Path) -> None:
    root = tmp_path / "root"
    hostile, normal = root / "hostile", root / "normal"
    checkpoint(hostile, 10, state=state_bytes(10))
    checkpoint(hostile, 20, state=state_bytes(20, D401))
    checkpoint(hostile, 30, state=state_bytes(30, grad_norm=D5000))
    checkpoint(normal, 10, state=state_bytes(10))
    checkpoint(normal, 20, state=state_bytes(20))
    args = ["--keep", "last:1", "--exit-when-done", "--settle", "0", "--rescan-interval", "3600", "--verbose"]
    w = Watch(root, args, tmp_path / "watch.log")
    try:
        w.wait_log(f"hostile/checkpoint-30 waiting: incomplete: {TOO_LONG}", timeout=30)
        wait_until(lambda: (steps(normal), steps(hostile)) == ([20], [20, 30]) or not w.alive(), 30, w.describe)
        assert w.alive(), w.describe()
        # Found by events while it runs: more of the same, then the final checkpoints of both runs.
        _add(hostile, 40, state_bytes(40, grad_norm=digits(4301, negative=True), stop=True))
        w.wait_log(f"hostile/checkpoint-40 waiting: incomplete: {TOO_LONG}", timeout=30)
        _add(hostile, 50, state_bytes(50, D401, stop=True))
        wait_until(lambda: steps(hostile) == [30, 40, 50] or not w.alive(), 30, w.describe)
        assert w.alive(), w.describe()  # the normal run has not finished training: the daemon waits for it
        _add(normal, 30, state_bytes(30, stop=True))
        assert w.wait_exit(30) == 0, w.describe()
    finally:
        w.kill()
    assert steps(normal) == [30]
    assert steps(hostile) == [30, 40, 50]
    log = w.log()
    assert "Traceback" not in log, log
    assert "exiting (--exit-when-done)" in log
