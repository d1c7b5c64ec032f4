"""The `--keep` parser and printer (SPEC "Rules"): every valid form, every malformed form with its exact
message, the roundtrip `parse(format(r)) == r`, and a fuzz that only RuleError ever escapes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptkeeper.rules import (
    VALID_FORMS,
    AnyRule,
    Best,
    Epoch,
    Every,
    Last,
    RuleError,
    default_direction,
    epoch_bucket,
    format_rule,
    format_rules,
    normalize_metric,
    parse_rule,
    parse_rules,
)

# Spelled out once so that a change to the wording users see is a deliberate one.
FORMS = (
    "last:N, best:N[:METRIC[:min|max]], epoch:all, epoch:N, every:K (N and K positive integers), separated by commas"
)


def test_valid_forms_text_is_pinned() -> None:
    assert VALID_FORMS == FORMS


# --- valid forms ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("best:1", Best(1, "eval_loss", "min")),
        ("best:2:accuracy", Best(2, "eval_accuracy", "max")),
        ("best:2:eval_accuracy", Best(2, "eval_accuracy", "max")),
        ("best:1:eval_f1:min", Best(1, "eval_f1", "min")),
        ("best:1:f1:min", Best(1, "eval_f1", "min")),
        ("best:1:perplexity_loss", Best(1, "eval_perplexity_loss", "min")),
        ("best:1:loss", Best(1, "eval_loss", "min")),
        ("best:1:eval_loss:max", Best(1, "eval_loss", "max")),
        ("best:3:eval_loss:min", Best(3, "eval_loss", "min")),
        ("best:1:a_loss", Best(1, "eval_a_loss", "min")),
        ("best:1:bleu:max", Best(1, "eval_bleu", "max")),
        ("best:1:rouge-l/f.1", Best(1, "eval_rouge-l/f.1", "max")),
        ("best:12", Best(12, "eval_loss", "min")),
        ("epoch:all", Epoch(None)),
        ("epoch:3", Epoch(3)),
        ("every:100", Every(100)),
        ("last:5", Last(5)),
        ("last:1", Last(1)),
        ("last:10", Last(10)),
        ("  last:5\t", Last(5)),
    ],
)
def test_each_valid_form_parses(text: str, expected: AnyRule) -> None:
    assert parse_rules(text) == (expected,)
    assert parse_rule(text) == expected


def test_several_rules_with_whitespace_around_commas() -> None:
    assert parse_rules(" best:1 ,last:5 ,  epoch:all,every:100 ") == (
        Best(1, "eval_loss", "min"),
        Last(5),
        Epoch(None),
        Every(100),
    )


def test_order_of_rules_is_kept() -> None:
    assert parse_rules("last:5,best:1") == (Last(5), Best(1))


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_an_empty_value_gives_no_rules(text: str) -> None:
    assert parse_rules(text) == ()


@pytest.mark.parametrize(
    ("rule", "text"),
    [
        (Best(1, "eval_loss", "min"), "best:1"),
        (Best(1, "eval_loss", "max"), "best:1:eval_loss:max"),
        (Best(2, "eval_accuracy", "max"), "best:2:eval_accuracy"),
        (Best(2, "eval_accuracy", "min"), "best:2:eval_accuracy:min"),
        (Best(1, "eval_f1", "min"), "best:1:eval_f1:min"),
        (Best(1, "eval_perplexity_loss", "min"), "best:1:eval_perplexity_loss"),
        (Epoch(None), "epoch:all"),
        (Epoch(3), "epoch:3"),
        (Every(100), "every:100"),
        (Last(5), "last:5"),
    ],
)
def test_format_rule_is_the_shortest_canonical_text(rule: AnyRule, text: str) -> None:
    assert format_rule(rule) == text
    assert parse_rule(text) == rule


def test_format_rules_joins_with_commas() -> None:
    rules = (Best(1), Last(5), Epoch(None), Every(20), Best(2, "eval_accuracy", "max"))
    assert format_rules(rules) == "best:1,last:5,epoch:all,every:20,best:2:eval_accuracy"
    assert format_rules(()) == ""


@pytest.mark.parametrize(
    ("metric", "direction"),
    [("eval_loss", "min"), ("eval_a_loss", "min"), ("eval_accuracy", "max"), ("eval_loss_ratio", "max")],
)
def test_default_direction_is_the_trainers(metric: str, direction: str) -> None:
    assert default_direction(metric) == direction


@pytest.mark.parametrize(("name", "metric"), [("accuracy", "eval_accuracy"), ("eval_accuracy", "eval_accuracy")])
def test_metric_names_get_the_eval_prefix_once(name: str, metric: str) -> None:
    assert normalize_metric(name) == metric


@pytest.mark.parametrize(
    ("epoch", "bucket"),
    [(0.38, 1), (1.0, 1), (1.15, 2), (0.9995, 1), (3.0000000000000004, 3), (2.9999999, 3), (2.0000001, 2)],
)
def test_epoch_bucket_examples_of_the_spec(epoch: float, bucket: int) -> None:
    assert epoch_bucket(epoch) == bucket


# --- malformed rules: exact messages ----------------------------------------------------------------------------


def _not_positive(rule: str, count: str) -> str:
    return f"invalid rule {rule!r}: {count!r} is not a positive integer. Valid forms: {FORMS}."


def _parts(rule: str, kind: str) -> str:
    return f"invalid rule {rule!r}: wrong number of parts for {kind!r}. Valid forms: {FORMS}."


MALFORMED = [
    # the SPEC's examples
    ("best:0", _not_positive("best:0", "0")),
    ("last:x", _not_positive("last:x", "x")),
    ("epoch:", _parts("epoch:", "epoch")),
    ("bestt:1", f"invalid rule 'bestt:1': unknown rule 'bestt'. Valid forms: {FORMS}."),
    ("best:1:loss:up", f"invalid rule 'best:1:loss:up': direction must be min or max, not 'up'. Valid forms: {FORMS}."),
    # more
    ("last:-1", _not_positive("last:-1", "-1")),
    ("last:1.5", _not_positive("last:1.5", "1.5")),
    ("last:+5", _not_positive("last:+5", "+5")),
    ("last: 5", _not_positive("last: 5", " 5")),
    ("last:1_000", _not_positive("last:1_000", "1_000")),
    ("last:\u0665", _not_positive("last:\u0665", "\u0665")),  # a non-ASCII digit that int() would accept
    ("last:01", _not_positive("last:01", "01")),  # one spelling per count, as scan.py does for checkpoint-N
    ("last:", _parts("last:", "last")),
    ("last", _parts("last", "last")),
    ("last:5:1", _parts("last:5:1", "last")),
    ("every:0", _not_positive("every:0", "0")),
    ("every:", _parts("every:", "every")),
    ("epoch:0", _not_positive("epoch:0", "0")),
    ("epoch:al", _not_positive("epoch:al", "al")),
    ("epoch:ALL", _not_positive("epoch:ALL", "ALL")),
    ("epoch:all:2", _parts("epoch:all:2", "epoch")),
    ("best", _parts("best", "best")),
    ("best:", _parts("best:", "best")),
    ("best::loss", _not_positive("best::loss", "")),
    ("best:1:loss:min:x", _parts("best:1:loss:min:x", "best")),
    ("best:1:", f"invalid rule 'best:1:': '' is not a metric name. Valid forms: {FORMS}."),
    ("best:1:acc uracy", f"invalid rule 'best:1:acc uracy': 'acc uracy' is not a metric name. Valid forms: {FORMS}."),
    ("best:1:loss:", f"invalid rule 'best:1:loss:': direction must be min or max, not ''. Valid forms: {FORMS}."),
    (
        "best:1:loss:MIN",
        f"invalid rule 'best:1:loss:MIN': direction must be min or max, not 'MIN'. Valid forms: {FORMS}.",
    ),
    ("LAST:5", f"invalid rule 'LAST:5': unknown rule 'LAST'. Valid forms: {FORMS}."),
    ("keep:5", f"invalid rule 'keep:5': unknown rule 'keep'. Valid forms: {FORMS}."),
    ("5", f"invalid rule '5': unknown rule '5'. Valid forms: {FORMS}."),
    ("last=5", f"invalid rule 'last=5': unknown rule 'last=5'. Valid forms: {FORMS}."),
    # lists: the bad piece is named, stripped of the whitespace around it
    ("last:5,,best:1", f"invalid rules 'last:5,,best:1': an empty rule between commas. Valid forms: {FORMS}."),
    ("last:5,", f"invalid rules 'last:5,': an empty rule between commas. Valid forms: {FORMS}."),
    (",last:5", f"invalid rules ',last:5': an empty rule between commas. Valid forms: {FORMS}."),
    ("last:5, bestt:1 ,epoch:all", f"invalid rule 'bestt:1': unknown rule 'bestt'. Valid forms: {FORMS}."),
    ("best:1:a,b", f"invalid rule 'b': unknown rule 'b'. Valid forms: {FORMS}."),
    (" last:x ", _not_positive("last:x", "x")),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED, ids=[t for t, _ in MALFORMED])
def test_malformed_rule_is_a_rule_error_naming_it_and_the_valid_forms(text: str, message: str) -> None:
    with pytest.raises(RuleError) as caught:
        parse_rules(text)
    assert str(caught.value) == message


def test_a_count_too_long_for_int_is_a_rule_error() -> None:
    """Python refuses to convert a string of more than 4300 digits to int (a ValueError that is not a
    RuleError); the parser must still answer with its usage message, not a traceback."""
    digits = "1" * 5000
    with pytest.raises(RuleError) as caught:
        parse_rules(f"last:{digits}")
    assert str(caught.value) == f"invalid rule 'last:{digits}': {digits!r} is too large. Valid forms: {FORMS}."


def test_rule_error_is_a_value_error() -> None:
    assert issubclass(RuleError, ValueError)


# --- properties -----------------------------------------------------------------------------------------------

counts = st.integers(min_value=1, max_value=10**12)
metric_names = st.one_of(
    st.just("eval_loss"),
    st.from_regex(r"[A-Za-z0-9_./-]{1,20}", fullmatch=True).map(normalize_metric),
)
rules = st.one_of(
    st.builds(Last, counts),
    st.builds(Every, counts),
    st.builds(Epoch, st.none() | counts),
    st.builds(Best, counts, metric_names, st.sampled_from(["min", "max"])),
)


@given(rules)
def test_roundtrip_of_one_rule(rule: AnyRule) -> None:
    assert parse_rule(format_rule(rule)) == rule


@given(st.lists(rules, min_size=1, max_size=6))
def test_roundtrip_of_a_rule_list(rule_list: list[AnyRule]) -> None:
    text = format_rules(rule_list)
    assert parse_rules(text) == tuple(rule_list)
    assert format_rules(parse_rules(text)) == text


FRAGMENTS = [
    "last", "best", "epoch", "every", "all", "bestt", ":", ":", ",", ",", " ", "\t", "0", "1", "5", "01",
    "-1", "1.5", "min", "max", "loss", "accuracy", "eval_", "acc uracy", "x", "\n", "\u0665", "é",
]  # fmt: skip
texts = st.one_of(st.text(max_size=40), st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join))


@settings(max_examples=400)
@given(texts)
def test_any_text_parses_or_raises_rule_error(text: str) -> None:
    try:
        parsed = parse_rules(text)
    except RuleError as e:
        assert str(e).endswith(f"Valid forms: {FORMS}.")
        assert str(e).startswith("invalid rule")
        return
    for rule in parsed:
        assert isinstance(rule, Last | Best | Epoch | Every)
        assert format_rule(rule) in text or isinstance(rule, Best)  # Best may gain the eval_ prefix
    # whatever parses is printed back in a form that parses to the same rules
    assert parse_rules(format_rules(parsed)) == parsed
