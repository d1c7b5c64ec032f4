"""The tolerant reader for trainer_state.json: what it reads, what it ignores, and the exact reason it gives
for a file it cannot use (the checkpoint then counts as incomplete, with that reason in the plan)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from ckptkeeper.trainer_state import TrainerState, TrainerStateError, parse_trainer_state

HF = Path(__file__).parent / "fixtures" / "hf"
REAL = HF / "A" / "checkpoint-78" / "trainer_state.json"


def parse(doc: dict[str, Any]) -> TrainerState:
    return parse_trainer_state(json.dumps(doc).encode())


def reason(data: bytes) -> str:
    with pytest.raises(TrainerStateError) as caught:
        parse_trainer_state(data)
    return str(caught.value)


def eval_entry(step: int, **values: object) -> dict[str, object]:
    return {"epoch": step / 26, **values, "step": step}


# --- a real file --------------------------------------------------------------------------------------


def test_a_real_file_is_read() -> None:
    state = parse_trainer_state(REAL.read_bytes())
    assert state.global_step == 78
    assert state.epoch == 3.0
    assert state.best_step == 78
    assert state.training_stopped is True
    assert state.metrics_at(78) == {
        "eval_loss": 0.38489747047424316,
        "eval_accuracy": 0.921875,
        "eval_runtime": 0.0123,
        "eval_samples_per_second": 5199.618,
        "eval_steps_per_second": 324.976,
    }
    # Older evals are in the history too, but they belong to other steps.
    assert state.metrics_at(70)["eval_loss"] == 0.419383704662323
    assert state.metrics_at(75) == {}
    assert [step for step, _ in state.evals] == [10, 20, 30, 40, 50, 60, 70, 78]


def test_every_cut_of_a_real_file_is_an_error_and_only_the_whole_parses() -> None:
    data = REAL.read_bytes()
    whole = parse_trainer_state(data)
    end = data.rindex(b"}") + 1  # the file ends "}\n": cutting the newline alone leaves valid JSON
    for cut in range(len(data)):
        if cut < end:
            with pytest.raises(TrainerStateError) as caught:
                parse_trainer_state(data[:cut])
            text = str(caught.value)
            assert text == "trainer_state.json is empty" or text.startswith("trainer_state.json is not valid JSON ("), (
                cut,
                text,
            )
        else:
            assert parse_trainer_state(data[:cut]) == whole


@pytest.mark.parametrize(
    ("cut", "expected"),
    [
        (0, "trainer_state.json is empty"),
        (1, "trainer_state.json is not valid JSON (Expecting property name enclosed in double quotes at byte 1)"),
        (2, "trainer_state.json is not valid JSON (Expecting property name enclosed in double quotes at byte 2)"),
        (26, "trainer_state.json is not valid JSON (Expecting ',' delimiter at byte 26)"),
    ],
)
def test_reasons_for_a_cut_file(cut: int, expected: str) -> None:
    # The file starts '{\n  "best_global_step": 78,' : byte 26 is just after "78".
    assert reason(REAL.read_bytes()[:cut]) == expected


# --- empty, not JSON, not an object -------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b" ", b"\n", b" \t\r\n  \n"], ids=["empty", "space", "newline", "whitespace"])
def test_an_empty_or_blank_file(data: bytes) -> None:
    assert reason(data) == "trainer_state.json is empty"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"[]", "array"),
        (b'[{"global_step": 78}]', "array"),
        (b'"checkpoint"', "string"),
        (b"78", "number"),
        (b"1.5", "number"),
        (b"NaN", "number"),
        (b"null", "null"),
        (b"true", "boolean"),
    ],
)
def test_json_that_is_not_an_object(data: bytes, kind: str) -> None:
    assert reason(data) == f"trainer_state.json holds a JSON {kind}, not an object"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{", "Expecting property name enclosed in double quotes at byte 1"),
        (b'{"global_step": 78}x', "Extra data at byte 19"),
        (b'{"global_step": 78,}', "Expecting property name enclosed in double quotes at byte 19"),
        (b"{'global_step': 78}", "Expecting property name enclosed in double quotes at byte 1"),
        (b"not json", "Expecting value at byte 0"),
    ],
)
def test_text_that_is_not_json(data: bytes, expected: str) -> None:
    assert reason(data) == f"trainer_state.json is not valid JSON ({expected})"


@pytest.mark.parametrize(
    "data",
    [
        b'{"global_step": 78, "note": "\xff"}',  # a stray byte in an unknown key's value
        b'{"global_step": 78, "\xe9poch": 1.0}',  # Latin-1, not UTF-8
        b'{"global_step": 78, "x": "\xc3"}',  # a UTF-8 sequence cut short
    ],
)
def test_bytes_that_are_not_utf8(data: bytes) -> None:
    assert reason(data) == "trainer_state.json is not UTF-8 text"


@pytest.mark.parametrize("depth", [1500, 100_000, 1_000_000])
def test_deep_nesting_is_an_error_not_a_crash(depth: int) -> None:
    assert reason(b"[" * depth) == "trainer_state.json is nested too deeply"
    inside = b'{"global_step": 78, "unknown": ' + b"[" * depth + b"]" * depth + b"}"
    assert reason(inside) == "trainer_state.json is nested too deeply"


def test_moderate_nesting_in_an_unknown_key_is_ignored() -> None:
    inside = b'{"global_step": 78, "unknown": ' + b"[" * 500 + b"]" * 500 + b"}"
    assert parse_trainer_state(inside).global_step == 78


# --- unknown keys and the Trainer's non-standard tokens ----------------------------------------------


def test_unknown_keys_anywhere_are_ignored() -> None:
    state = parse(
        {
            "global_step": 10,
            "epoch": 0.5,
            "some_future_key": {"nested": [1, 2, {"x": None}]},
            "log_history": [eval_entry(10, eval_loss=0.5, new_field="text", another={"a": 1})],
            "stateful_callbacks": {"SomethingElse": {"args": 5}, "TrainerControl": {"args": {"extra": 1}}},
            "trial_params": {"lr": 1e-4},
        }
    )
    assert state.global_step == 10
    assert state.epoch == 0.5
    assert state.metrics_at(10) == {"eval_loss": 0.5}
    assert state.training_stopped is False


def test_nan_and_infinity_tokens_are_read() -> None:
    data = (
        b'{"global_step": 20, "epoch": 1.0, "best_metric": -Infinity, "best_global_step": null, '
        b'"other": Infinity, "log_history": ['
        b'{"eval_loss": NaN, "eval_accuracy": 0.5, "step": 20},'
        b'{"eval_worst": -Infinity, "eval_top": Infinity, "step": 10}]}'
    )
    state = parse_trainer_state(data)
    assert state.global_step == 20
    assert state.best_step is None
    at_20 = state.metrics_at(20)
    assert set(at_20) == {"eval_loss", "eval_accuracy"}
    assert math.isnan(at_20["eval_loss"])
    assert state.metrics_at(10) == {"eval_worst": -math.inf, "eval_top": math.inf}


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity"])
def test_a_non_finite_epoch_reads_as_no_epoch(token: bytes) -> None:
    state = parse_trainer_state(b'{"global_step": 5, "epoch": ' + token + b"}")
    assert state.epoch is None
    assert state.global_step == 5


def test_a_byte_order_mark_is_refused_as_the_trainer_cannot_resume_from_it() -> None:
    # TrainerState.load_from_json reads the file as UTF-8 text and json.loads refuses a leading U+FEFF.
    assert reason(b'\xef\xbb\xbf{"global_step": 3}') == (
        "trainer_state.json starts with a byte order mark, which the Trainer cannot read"
    )


@pytest.mark.parametrize("codec", ["utf-16", "utf-32"])
def test_utf16_and_utf32_are_not_utf8_text(codec: str) -> None:
    # json.loads(bytes) would detect and accept these; the Trainer's open(encoding="utf-8") cannot.
    assert reason('{"global_step": 3}'.encode(codec)) == "trainer_state.json is not UTF-8 text"
    # Without a BOM, UTF-16 of ASCII text is valid UTF-8 full of NUL characters: not JSON.
    assert reason('{"global_step": 3}'.encode(codec + "-le")).startswith("trainer_state.json is not valid JSON (")


def test_a_json_error_after_non_ascii_text_gives_the_byte_offset() -> None:
    assert reason('{"n": "é", x}'.encode()) == (
        "trainer_state.json is not valid JSON (Expecting property name enclosed in double quotes at byte 12)"
    )


# --- types of the keys ckptkeeper uses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"global_step": "78"}, "trainer_state.json: global_step: input should be a valid integer"),
        ({"global_step": 78.0}, "trainer_state.json: global_step: input should be a valid integer"),
        ({"global_step": True}, "trainer_state.json: global_step: input should be a valid integer"),
        ({"global_step": [78]}, "trainer_state.json: global_step: input should be a valid integer"),
        ({"epoch": "1.0"}, "trainer_state.json: epoch: input should be a valid number"),
        ({"epoch": True}, "trainer_state.json: epoch: input should be a valid number"),
        ({"epoch": {"value": 1.0}}, "trainer_state.json: epoch: input should be a valid number"),
        ({"best_global_step": "52"}, "trainer_state.json: best_global_step: input should be a valid integer"),
        ({"best_global_step": False}, "trainer_state.json: best_global_step: input should be a valid integer"),
        ({"best_model_checkpoint": 52}, "trainer_state.json: best_model_checkpoint: input should be a valid string"),
        ({"log_history": {"step": 10}}, "trainer_state.json: log_history: input should be a valid list"),
        ({"log_history": [{"step": 5}, 7]}, "trainer_state.json: log_history.1: input should be a valid dictionary"),
        ({"stateful_callbacks": []}, "trainer_state.json: stateful_callbacks: input should be a valid dictionary"),
    ],
)
def test_wrong_types_for_used_keys_are_errors(doc: dict[str, Any], expected: str) -> None:
    assert reason(json.dumps(doc).encode()) == expected


def test_an_integer_epoch_reads_as_a_float() -> None:
    state = parse({"global_step": 26, "epoch": 1})
    assert state.epoch == 1.0
    assert type(state.epoch) is float


def test_nulls_and_missing_keys_mean_unknown() -> None:
    state = parse({"global_step": None, "epoch": None, "best_global_step": None, "best_model_checkpoint": None})
    assert state == TrainerState(global_step=None, epoch=None, best_steps=(), training_stopped=False)
    assert parse({}) == state


def test_a_large_global_step_is_read_exactly() -> None:
    assert parse({"global_step": 10**30}).global_step == 10**30


# --- metrics -----------------------------------------------------------------------------------------


def test_missing_log_history_means_no_metrics() -> None:
    state = parse({"global_step": 10, "epoch": 0.4})
    assert state.evals == ()
    assert state.metrics_at(10) == {}


def test_metric_values_that_are_not_numbers_are_ignored() -> None:
    state = parse(
        {
            "log_history": [
                eval_entry(10, eval_loss="0.5", eval_accuracy=0.75, eval_flag=True, eval_none=None, eval_list=[1]),
            ]
        }
    )
    assert state.metrics_at(10) == {"eval_accuracy": 0.75}


def test_an_entry_whose_only_eval_values_are_not_numbers_is_no_eval() -> None:
    state = parse({"log_history": [eval_entry(10, eval_loss="0.5", eval_done=False)]})
    assert state.evals == ()
    assert state.metrics_at(10) == {}


def test_integer_metric_values_read_as_floats() -> None:
    state = parse({"log_history": [eval_entry(10, eval_loss=1, eval_samples=64)]})
    assert state.metrics_at(10) == {"eval_loss": 1.0, "eval_samples": 64.0}
    assert all(type(v) is float for v in state.metrics_at(10).values())


def test_entries_without_an_integer_step_are_skipped() -> None:
    state = parse(
        {
            "log_history": [
                {"eval_loss": 0.1},  # no step
                {"eval_loss": 0.2, "step": None},
                {"eval_loss": 0.3, "step": "10"},
                {"eval_loss": 0.4, "step": 10.0},
                {"eval_loss": 0.5, "step": True},  # a bool is not a step (True == 1)
                {"eval_loss": 0.6, "step": 10},
            ]
        }
    )
    assert state.evals == ((10, {"eval_loss": 0.6}),)
    assert state.metrics_at(1) == {}


def test_training_log_entries_are_not_metrics() -> None:
    state = parse(
        {
            "log_history": [
                {"epoch": 0.4, "grad_norm": 0.3, "learning_rate": 0.009, "loss": 0.69, "step": 10},
                {"epoch": 1.0, "train_loss": 0.6, "train_runtime": 5.0, "step": 26},
            ]
        }
    )
    assert state.evals == ()
    assert state.metrics_at(10) == {}


def test_several_eval_entries_at_one_step_are_united() -> None:
    state = parse(
        {
            "log_history": [
                {"loss": 0.7, "step": 20},
                eval_entry(20, eval_a_loss=0.5, eval_a_accuracy=0.8),
                eval_entry(20, eval_b_loss=0.6, eval_b_accuracy=0.7),
                eval_entry(10, eval_a_loss=0.9),
            ]
        }
    )
    assert state.metrics_at(20) == {
        "eval_a_loss": 0.5,
        "eval_a_accuracy": 0.8,
        "eval_b_loss": 0.6,
        "eval_b_accuracy": 0.7,
    }
    assert state.metrics_at(10) == {"eval_a_loss": 0.9}


def test_evals_at_other_steps_are_not_this_checkpoints_metrics() -> None:
    # Run C: save every 7, eval every 10: checkpoint-14's history ends with the eval at step 10.
    data = (HF / "C" / "checkpoint-14" / "trainer_state.json").read_bytes()
    state = parse_trainer_state(data)
    assert state.global_step == 14
    assert state.metrics_at(14) == {}
    assert state.metrics_at(10)["eval_loss"] == 0.6632475852966309


# --- the Trainer's best ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"best_global_step": 52, "best_model_checkpoint": "/job/outputs/B/checkpoint-52"}, 52),
        # best_global_step wins over the path
        ({"best_global_step": 52, "best_model_checkpoint": "/job/outputs/B/checkpoint-26"}, 52),
        ({"best_global_step": 0}, 0),
        ({"best_global_step": None, "best_model_checkpoint": "/job/outputs/B/checkpoint-52"}, 52),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-52"}, 52),
        ({"best_model_checkpoint": "outputs/B/checkpoint-52"}, 52),  # relative output_dir stays relative
        ({"best_model_checkpoint": "checkpoint-52"}, 52),
        ({"best_model_checkpoint": "./checkpoint-52"}, 52),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-52/"}, 52),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-52//"}, 52),
        # only the last component counts: another machine's absolute path still matches
        ({"best_model_checkpoint": "/somewhere/else/entirely/checkpoint-52"}, 52),
        ({"best_model_checkpoint": "/job/outputs/checkpoint-52/tmp"}, None),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-abc"}, None),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-"}, None),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint--5"}, None),
        # not the Trainer's name for step 52 (nor for 7): scan never treats checkpoint-0052 as a checkpoint
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-0052"}, None),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-0"}, 0),
        ({"best_model_checkpoint": "/job/outputs/B/checkpoint-\u0661\u0662"}, None),
        ({"best_model_checkpoint": "/job/outputs/B/best-52"}, None),
        ({"best_model_checkpoint": "/job/outputs/B"}, None),
        ({"best_model_checkpoint": ""}, None),
        ({"best_model_checkpoint": None, "best_global_step": None, "best_metric": "-Infinity"}, None),
        ({}, None),
    ],
)
def test_the_trainer_best(doc: dict[str, Any], expected: int | None) -> None:
    assert parse(doc).best_step == expected


def test_unset_best_as_the_trainer_writes_it() -> None:
    state = parse_trainer_state(b'{"best_global_step": null, "best_metric": -Infinity, "best_model_checkpoint": null}')
    assert state.best_step is None


# --- should_training_stop ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("callbacks", "expected"),
    [
        ({"TrainerControl": {"args": {"should_training_stop": True}, "attributes": {}}}, True),
        ({"TrainerControl": {"args": {"should_training_stop": False}}}, False),
        ({"TrainerControl": {"args": {"should_training_stop": "true"}}}, False),
        ({"TrainerControl": {"args": {"should_training_stop": 1}}}, False),
        ({"TrainerControl": {"args": {}}}, False),
        ({"TrainerControl": {"args": [True]}}, False),
        ({"TrainerControl": "stop"}, False),
        ({"TrainerControl": None}, False),
        ({"EarlyStoppingCallback": {"args": {"should_training_stop": True}}}, False),
        ({}, False),
    ],
)
def test_training_stopped(callbacks: dict[str, Any], expected: bool) -> None:
    assert parse({"stateful_callbacks": callbacks}).training_stopped is expected


@pytest.mark.parametrize(("path", "stopped"), [("A/checkpoint-70", False), ("A/checkpoint-78", True)])
def test_training_stopped_in_real_files(path: str, stopped: bool) -> None:
    assert parse_trainer_state((HF / path / "trainer_state.json").read_bytes()).training_stopped is stopped


def test_a_best_model_checkpoint_written_on_windows_is_matched_by_its_last_component() -> None:
    state = parse_trainer_state(json.dumps({"best_model_checkpoint": "C:\\job\\out\\checkpoint-10"}).encode())
    assert state.best_step == 10


def test_both_best_global_step_and_best_model_checkpoint_are_the_trainers_best() -> None:
    """Eval every 5 steps, save every 10: best_global_step may name an eval step with no checkpoint, while
    best_model_checkpoint (what load_best_model_at_end loads) stays on the last saved best."""
    state = parse({"global_step": 80, "best_global_step": 75, "best_model_checkpoint": "out/checkpoint-70"})
    assert state.best_steps == (75, 70)
    assert state.best_step == 75
    same = parse({"global_step": 80, "best_global_step": 70, "best_model_checkpoint": "out/checkpoint-70"})
    assert same.best_steps == (70,)
