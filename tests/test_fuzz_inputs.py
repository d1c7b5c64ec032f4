"""Fuzzing every way text gets into ckptkeeper: the `--keep` parser, the config loader (YAML and TOML files,
`CKPTKEEPER_*` variables, flags, arbitrary bytes) and the CLI.

The contract under fuzz: an input is either accepted (and then behaves: rules print back to the same rules,
settings give a working policy) or refused with the project's own error and a message; never another
exception, never a traceback, never exit 1. test_rules.py and test_config.py fuzz free text and dicts of
settings; this file adds near-valid mutations, TOML written from values, environment dictionaries, the three
sources together, and the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ckptkeeper.cli import main
from ckptkeeper.config import ConfigError, load_settings
from ckptkeeper.integrity import encode_safetensors
from ckptkeeper.rules import VALID_FORMS, Best, Epoch, Every, Last, RuleError, format_rules, parse_rules
from ckptkeeper.settings import Settings, setting_keys

BOUNDED = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEWER = settings(BOUNDED, max_examples=100)

KEYS = sorted(setting_keys())  # as a user writes them
SETTING_FIELDS = {f.name for f in dataclasses.fields(Settings)}

# --- --keep: arbitrary and near-valid text ---------------------------------------------------------------------

# Every character, lone surrogates included (a non-UTF-8 argv byte reaches Python as one).
any_char = st.characters(exclude_categories=())
TRICKY = [":", ",", " ", "\t", "\n", "0", "1", "9", "-", "+", "_", ".", "e", "/", "\x00", "\u0663", "\uff11", "\u00a0"]

counts = st.one_of(st.integers(1, 20), st.integers(1, 10**30)).map(str)
metrics = st.one_of(
    st.sampled_from(["loss", "eval_loss", "accuracy", "eval_f1", "bleu", "rouge-l/f.1", "a_loss", "eval_"]),
    st.from_regex(r"[A-Za-z0-9_./-]{1,12}", fullmatch=True),
)
valid_rule = st.one_of(
    counts.map(lambda n: f"last:{n}"),
    counts.map(lambda n: f"every:{n}"),
    st.just("epoch:all"),
    counts.map(lambda n: f"epoch:{n}"),
    counts.map(lambda n: f"best:{n}"),
    st.tuples(counts, metrics).map(lambda t: f"best:{t[0]}:{t[1]}"),
    st.tuples(counts, metrics, st.sampled_from(["min", "max"])).map(lambda t: f"best:{t[0]}:{t[1]}:{t[2]}"),
)
valid_rules = st.lists(valid_rule, min_size=1, max_size=5).map(",".join)


@st.composite
def near_valid(draw: st.DrawFn) -> str:
    """A valid --keep value with a few small mutations: what a typo or a careless script produces."""
    text = draw(valid_rules)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace", "upper", "digits", "spaces", "duplicate"]))
        char = draw(st.one_of(st.sampled_from(TRICKY), any_char))
        if op == "insert":
            text = text[:at] + char + text[at:]
        elif op == "delete":
            text = text[:at] + text[at + 1 :]
        elif op == "replace":
            text = text[:at] + char + text[at + 1 :]
        elif op == "upper":
            text = text.upper()
        elif op == "digits":  # digits that int() accepts and a rule must not
            text = text.translate(
                str.maketrans("0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669")
            )
        elif op == "spaces":
            text = text.replace(",", " , ").replace(":", draw(st.sampled_from([":", " :", ": "])))
        else:
            text = text[:at] + text[at : at + draw(st.integers(1, 8))] + text[at:]
    return text


keep_texts = st.one_of(
    st.text(any_char, max_size=60), st.lists(st.sampled_from(TRICKY), max_size=20).map("".join), near_valid()
)


def check_rules(text: str) -> tuple[Any, ...] | None:
    """Either rules that print back to themselves, or a RuleError that names the valid forms."""
    try:
        rules = parse_rules(text)
    except RuleError as e:
        message = str(e)
        assert message.strip()
        assert message.startswith("invalid rule")
        assert message.endswith(f"Valid forms: {VALID_FORMS}.")
        return None
    for rule in rules:
        match rule:
            case Last(n) | Every(n):
                assert n >= 1
            case Epoch(n):
                assert n is None or n >= 1
            case Best(n, metric, direction):
                assert n >= 1 and metric.startswith("eval_") and direction in ("min", "max")
    printed = format_rules(rules)
    assert parse_rules(printed) == rules
    assert format_rules(parse_rules(printed)) == printed
    # Blank space around the pieces never matters.
    spaced = " , ".join(f" {p}\t" for p in text.split(","))
    assert parse_rules(spaced) == rules
    return rules


@BOUNDED
@given(keep_texts)
@example("best:1:loss:up")
@example("last:" + "9" * 5000)
@example("last:\u0665")
@example(",")
@example("best:1:acc\udcffuracy")
def test_any_keep_text_parses_and_round_trips_or_is_a_rule_error(text: str) -> None:
    check_rules(text)


@BOUNDED
@given(valid_rules)
def test_valid_keep_texts_always_parse(text: str) -> None:
    rules = check_rules(text)
    assert rules is not None and len(rules) == text.count(",") + 1


# --- the config loader: files, environment, flags ---------------------------------------------------------------

paths = st.one_of(st.text(max_size=20), st.sampled_from(["/tmp/x", "relative/dir", "a\x00b", "~", "", " "]))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 0.0, -1, 3600, 3600.5, 86400, 1e308])
)
ints = st.one_of(st.integers(-5, 70), st.integers(-(2**70), 2**70), st.sampled_from([65535, 65536, 0]))
plausible: dict[str, st.SearchStrategy[Any]] = {
    "root": paths,
    "archive_to": st.one_of(
        paths, st.sampled_from(["s3://bucket/runs", "gs://b", "s3://", "nosuch://x/y", "s3://a\x00b"])
    ),
    "archive_options": st.one_of(
        st.dictionaries(
            st.text(max_size=6), st.one_of(st.none(), st.booleans(), ints, st.text(max_size=8)), max_size=3
        ),
        st.lists(st.one_of(st.text(max_size=10), st.sampled_from(["anon=true", "a=", "=b", "x=[1, 2"])), max_size=3),
        st.text(max_size=12),
    ),
    "state_dir": paths,
    "keep": st.one_of(keep_texts, st.lists(keep_texts, max_size=4)),
    "keep_weights": st.one_of(keep_texts, st.lists(keep_texts, max_size=4)),
    "keep_under_pressure": st.one_of(keep_texts, st.lists(keep_texts, max_size=4)),
    "min_free": st.one_of(
        st.sampled_from(
            ["50G", "40Gi", "10%", "0%", "100%", "1.5T", "12", "G", "-1G", "1e3", "50 GiB", "", "9" * 5000]
        ),
        ints,
        floats,
        st.text(max_size=8),
    ),
    "max_depth": ints,
    "metrics_port": st.one_of(st.none(), ints),
    "protect_trainer_best": st.one_of(st.booleans(), st.sampled_from(["yes", "true", 1, 0, None])),
    "dry_run": st.one_of(st.booleans(), st.sampled_from(["no", 1])),
    "exit_when_done": st.booleans(),
    "standby": st.booleans(),
    "settle": st.one_of(st.none(), floats),
    "stale_after": st.one_of(
        st.sampled_from(["1h", "90s", "1h30m", "3d", "0s", "0", "-1h", "1y", "366d", "", "1h 30m", "9" * 400 + "d"]),
        ints,
        floats,
        st.text(max_size=8),
    ),
    "rescan_interval": floats,
    "poll": st.one_of(st.none(), floats),
    "grace": floats,
    "log_format": st.sampled_from(["text", "json", "JSON", "xml", "", 1]),
    "metrics_host": st.one_of(st.text(max_size=15), st.sampled_from(["0.0.0.0", "::1", "localhost"])),
    "metrics": st.one_of(
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.sampled_from(["acc", "eval_x", "a b", "1a"])),
            st.one_of(
                st.text(max_size=12),
                st.sampled_from(["file:r.json#/acc", "lm-eval:/nonexistent#/r", "file:../x#/a", "file:r.json#a~2"]),
            ),
            max_size=3,
        ),
        st.text(max_size=12),
        st.lists(st.text(max_size=6), max_size=2),
    ),
    "await": st.one_of(
        st.lists(st.one_of(st.text(max_size=8), st.sampled_from(["acc", "acc:2h", "acc:0s", "acc:soon", ":1h"]))),
        st.text(max_size=10),
    ),
}
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12))
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def setting_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly real keys with plausible values; sometimes a misspelt key or a value of the wrong shape."""
    names = draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True))
    data = {
        name: draw(st.one_of(plausible[name], anything) if draw(st.integers(0, 9)) == 0 else plausible[name])
        for name in names
    }
    if draw(st.integers(0, 4)) == 0:
        data[draw(st.sampled_from(["kep", "max-depth", "Keep", "archive", "root "]))] = draw(scalars)
    return data


def toml_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return toml_scalar(value)


def toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return toml_float(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a basic TOML string is written as a JSON one (\uXXXX escapes)
    raise TypeError(value)


def toml_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


def write_toml(path: Path, data: dict[str, Any]) -> None:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items() if v is not None]  # TOML has no null
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")


def write_yaml(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8", errors="surrogatepass")


def check_settings(load: Callable[[], Settings]) -> Settings | None:
    """Settings that give a working policy, or a ConfigError with one non-empty line per problem."""
    try:
        loaded = load()
    except ConfigError as e:
        lines = str(e).split("\n")
        assert lines and all(line.strip() for line in lines), repr(str(e))
        return None
    assert 0 <= loaded.max_depth <= 64
    assert loaded.metrics_port is None or 0 <= loaded.metrics_port <= 65535
    for value in (loaded.settle, loaded.poll, loaded.rescan_interval, loaded.grace):
        assert value is None or math.isfinite(value)
    policy = loaded.policy()
    assert parse_rules(loaded.rules_text()) == policy.rules
    for path in (loaded.root, loaded.archive_to, loaded.state_dir):
        assert path is None or "\0" not in str(path)
    assert all(isinstance(k, str) for k in loaded.archive_options)
    return loaded


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    return tmp_path


@BOUNDED
@given(data=setting_dicts(), suffix=st.sampled_from([".yaml", ".yml", ".toml"]))
def test_fuzz_config_files_written_from_values(config_dir: Path, data: dict[str, Any], suffix: str) -> None:
    path = config_dir / f"config{suffix}"
    try:
        (write_toml if suffix == ".toml" else write_yaml)(path, data)
    except UnicodeEncodeError:
        return  # a lone surrogate that even surrogatepass cannot write as UTF-8 text: not a file anyone has
    check_settings(lambda: load_settings(path, {}, {}))


DEEP_AND_ODD = [
    b"keep: " + b"[" * 1200,
    b"keep = " + b"[" * 1200,
    b"max_depth: " + b"9" * 5000,
    b"keep: 2001-13-01",
    b"settle: .nan",
    b"\xef\xbb\xbfkeep: last:1",
    b"\xff\xfekeep: last:1",
    b"a: &a [x, x]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\nkeep: *c\n",
    b"keep: !!python/object/apply:os.system ['true']",
    b"? [a]\n: 1",
    b"keep: [last:1]\r\nmax_depth: 2\r",
]


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
@pytest.mark.parametrize("raw", DEEP_AND_ODD, ids=range(len(DEEP_AND_ODD)))
def test_deep_odd_and_hostile_config_files(config_dir: Path, raw: bytes, suffix: str) -> None:
    path = config_dir / f"config{suffix}"
    path.write_bytes(raw)
    check_settings(lambda: load_settings(path, {}, {}))


@st.composite
def damaged_config(draw: st.DrawFn) -> bytes:
    """A valid YAML config with a few bytes overwritten by arbitrary ones (non-UTF-8 included)."""
    raw = bytearray(yaml.safe_dump(draw(setting_dicts()), allow_unicode=True).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(1, 4))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@BOUNDED
@given(raw=st.one_of(st.binary(max_size=80), damaged_config()), suffix=st.sampled_from([".yaml", ".toml", ""]))
def test_fuzz_config_files_of_arbitrary_bytes(config_dir: Path, raw: bytes, suffix: str) -> None:
    path = config_dir / f"config{suffix}"
    path.write_bytes(raw)
    check_settings(lambda: load_settings(path, {}, {}))


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env: dict[str, str] = {}
    for name in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        value = draw(plausible[name])
        env["CKPTKEEPER_" + name.upper()] = draw(st.one_of(st.just(str(value)), st.text(any_char, max_size=15)))
    if draw(st.integers(0, 4)) == 0:
        env[draw(st.sampled_from(["CKPTKEEPER_KEEP_", "CKPTKEEPER_MAXDEPTH", "CKPTKEEPER_", "ckptkeeper_keep"]))] = (
            draw(st.text(max_size=5))
        )
    if draw(st.integers(0, 3)) == 0:
        env[draw(st.sampled_from(["PATH", "HOME", "CKPTKEEPER"]))] = draw(st.text(max_size=5))
    return env


@BOUNDED
@given(env=environments())
@example({"CKPTKEEPER_MAX_DEPTH": "9" * 5000})
@example({"CKPTKEEPER_MAX_DEPTH": "[" * 1200})
@example({"CKPTKEEPER_SETTLE": "2001-13-01"})
@example({"CKPTKEEPER_CONFIG": "/dev/zero"})
@example({"CKPTKEEPER_CONFIG": "/no/such/config.yaml"})
@example({"CKPTKEEPER_CONFIG": "/"})
@example({"CKPTKEEPER_CONFIG": "a\x00b.yaml"})
@example({"CKPTKEEPER_KEEP": "last:\udcff"})
def test_fuzz_environment(env: dict[str, str]) -> None:
    check_settings(lambda: load_settings(None, {}, env))


@FEWER
@given(
    data=setting_dicts(),
    env=environments(),
    flags=setting_dicts(),
    suffix=st.sampled_from([".yaml", ".toml"]),
    via_env=st.booleans(),
)
def test_fuzz_file_environment_and_flags_together(
    config_dir: Path, data: dict[str, Any], env: dict[str, str], flags: dict[str, Any], suffix: str, via_env: bool
) -> None:
    path = config_dir / f"config{suffix}"
    try:
        (write_toml if suffix == ".toml" else write_yaml)(path, data)
    except UnicodeEncodeError:
        return
    env = {**env, "CKPTKEEPER_CONFIG": str(path)} if via_env else env
    loaded = check_settings(lambda: load_settings(None if via_env else path, flags, env))
    if loaded is not None:
        # Flags win over everything: a flag that loaded is the value in the settings.
        for name, value in flags.items():
            if name in SETTING_FIELDS and value is not None and isinstance(value, bool):
                assert getattr(loaded, name) is value


# --- the CLI: --keep, and CKPTKEEPER_KEEP --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run with eval_loss and eval_accuracy (so best:1:accuracy needs no refusal), read by every example."""
    root = tmp_path_factory.mktemp("fuzz-root")
    model = encode_safetensors({"w": ("float32", [2], bytes(8))}, {"format": "pt"})
    for step in (10, 20, 30):
        directory = root / "run" / f"checkpoint-{step}"
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(model)
        history = [{"step": step, "eval_loss": 1 / step, "eval_accuracy": step / 100, "epoch": step / 10}]
        (directory / "trainer_state.json").write_text(
            json.dumps({"global_step": step, "epoch": step / 10, "log_history": history})
        )
    before = sorted(os.walk(root))
    yield root
    assert sorted(os.walk(root)) == before, "a plan or dry run changed the tree"


def expected_exit(text: str) -> int:
    try:
        rules = parse_rules(text)
    except RuleError:
        return 2
    if not rules:
        return 3  # no keep rule: refused
    if any(isinstance(r, Best) and r.metric not in ("eval_loss", "eval_accuracy") for r in rules):
        return 3  # a best rule on a metric this run does not have: refused
    return 0


def clean_environment() -> dict[str, str | None]:
    return {k: None for k in os.environ if k.startswith("CKPTKEEPER_")}


def check_cli(args: list[str], text: str) -> str:
    """Run the command in-process: exit 0, 2 (a usage error naming --keep) or 3 (refused), as the rules say."""
    result = CliRunner().invoke(main, args, env=clean_environment())
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback
    assert "Traceback" not in result.output
    assert result.exit_code == expected_exit(text), (text, result.output)
    if result.exit_code == 2:
        assert "Invalid value for '--keep'" in result.stderr and "invalid rule" in result.stderr, result.stderr
    if result.exit_code == 3:
        # no rule at all, or a metric the run does not have (one run: one line)
        nothing = "was" if args[0] == "prune" else "would be"  # a prune, dry run or not, says what it did
        refused = (
            "Error: refused: no keep rule given",
            f"Error: refused in run 'run'; nothing {nothing} removed: rule ",
        )
        assert result.stderr.startswith(refused), result.stderr
    return result.stdout


@BOUNDED
@given(text=keep_texts)
@example("best:1:acuracy")
@example("")
@example(",,")
@example("last:" + "1" * 5000)
def test_fuzz_keep_on_the_command_line(cli_root: Path, text: str) -> None:
    out = check_cli(["plan", str(cli_root), "--keep", text, "--json"], text)
    if expected_exit(text) != 2 and parse_rules(text):  # a plan refused for its best rule still prints itself
        assert json.loads(out)["keep"] == format_rules(parse_rules(text))


@FEWER
@given(text=keep_texts)
def test_fuzz_keep_in_a_prune_dry_run(cli_root: Path, text: str) -> None:
    out = check_cli(["prune", str(cli_root), "--keep", text, "--dry-run"], text)
    if expected_exit(text) == 0:
        assert "nothing was changed" in out


def _can_be_an_environment_value(text: str) -> bool:
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate that no byte string decodes to
        return False


@FEWER
@given(text=keep_texts.filter(_can_be_an_environment_value))
def test_fuzz_keep_from_the_environment(cli_root: Path, text: str) -> None:
    """CKPTKEEPER_KEEP: an empty value counts as unset; a bad one is exit 2 naming the variable."""
    result = CliRunner().invoke(
        main, ["plan", str(cli_root), "--json"], env={**clean_environment(), "CKPTKEEPER_KEEP": text}
    )
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if text == "":
        assert result.exit_code == 3  # unset: no rule, refused
        return
    # The environment's keep is split on commas and each piece parsed like a --keep rule.
    pieces = [p.strip() for p in text.split(",") if p.strip()]
    try:
        rules = parse_rules(",".join(pieces))
    except RuleError:
        assert result.exit_code == 2, (text, result.output)
        assert "CKPTKEEPER_KEEP" in result.stderr
        return
    assert result.exit_code == expected_exit(",".join(pieces)), (text, result.output)
    if result.exit_code == 0:
        assert json.loads(result.stdout)["keep"] == format_rules(rules)
