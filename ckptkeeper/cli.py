"""Command line: thin click commands over the library. Domain errors become click errors here only.

Heavy modules (pydantic, safetensors) are imported inside the commands so `--help` starts fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ckptkeeper import __version__
from ckptkeeper.cli_pins import PIN_COMMANDS
from ckptkeeper.colour import Palette
from ckptkeeper.units import count

if TYPE_CHECKING:
    from ckptkeeper.engine import PassResult, Pipeline
    from ckptkeeper.removals import ProgressSink
    from ckptkeeper.settings import Settings
    from ckptkeeper.watch import WatchOptions

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_LOCKED = 4

EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 a failure while acting (prune: or a --min-free floor it cannot meet); "
    "2 usage or config error; "
    "3 refused by a safety rule (nothing removed); 4 another instance holds the root's lock."
)

F = TypeVar("F", bound=Callable[..., Any])


class Refused(click.ClickException):
    """The message says it was refused and why (`refused: ...`, `refused in 2 runs; ...`)."""

    exit_code = EXIT_REFUSED


class Locked(click.ClickException):
    exit_code = EXIT_LOCKED


class Failed(click.ClickException):
    exit_code = EXIT_FAILED


class ConfigProblem(click.ClickException):
    exit_code = EXIT_USAGE


def _echo(message: str, err: bool = False) -> None:
    """click.echo for text that may hold a path that is not UTF-8: Python holds its bytes as lone surrogates,
    which a UTF-8 stdout refuses (UnicodeEncodeError halfway through a prune); they are shown as `\\udcff`,
    as in --json."""
    click.echo(message.encode("utf-8", "backslashreplace").decode("utf-8"), err=err)


def _palette() -> Palette:
    """Colour for stdout when it is a terminal (and NO_COLOR is not set); click.echo strips it otherwise."""
    return Palette.for_stream(sys.stdout)


def _check_keep(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> str | None:
    """Every `--keep` given, merged as if joined by commas (a repeated flag adds rules, never replaces them);
    None when there is none, so the environment's or config file's `keep` applies."""
    from ckptkeeper.rules import RuleError, parse_rules

    if not value:
        return None
    for text in value:
        try:
            parse_rules(text)
        except RuleError as e:
            raise click.BadParameter(str(e)) from None
    # An empty value adds no rule (`--keep "$EXTRA"` with EXTRA unset); only empty ones still mean no rule.
    return ",".join(text for text in value if text.strip())


def _check_metrics(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str] | None:
    """Every `--metric NAME=SOURCE#POINTER`, as the `metrics` mapping; None when none is given."""
    from ckptkeeper.metric_specs import MetricSpecError, parse_metric

    if not value:
        return None
    found: dict[str, str] = {}
    for text in value:
        try:
            spec = parse_metric(text)
        except MetricSpecError as e:
            raise click.BadParameter(str(e)) from None
        if spec.name in found:
            raise click.BadParameter(f"{spec.name} is defined twice; give each name once")
        found[spec.name] = text.partition("=")[2]
    return found


def _check_floor(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ckptkeeper.pressure import FloorError, parse_floor

    if value is None:
        return None
    try:
        parse_floor(value)
    except FloorError as e:
        raise click.BadParameter(str(e).removeprefix("invalid --min-free ")) from None
    return value


def _check_duration(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from ckptkeeper.settings import MAX_STALE_AFTER
    from ckptkeeper.units import DURATION_FORMS, parse_seconds

    if value is None:
        return None
    seconds = parse_seconds(value)
    if seconds is None or not 0 < seconds <= MAX_STALE_AFTER:
        raise click.BadParameter(
            f"{value!r} is not a duration: expected one such as {DURATION_FORMS}, or seconds "
            "(more than 0, at most 365d)"
        )
    return value


def policy_options(command: F) -> F:
    """The options plan, prune and watch share: everything that decides what is kept."""
    for decorator in reversed([*_rule_options(), *_metric_options(), *_path_options()]):
        command = decorator(command)
    return command


def _rule_options() -> list[Callable[[F], F]]:
    return [
        click.argument("root", required=False, type=click.Path(path_type=Path)),
        click.option(
            "--keep",
            "-k",
            multiple=True,
            callback=_check_keep,
            metavar="RULES",
            help="Keep rules, comma-separated: last:N, best:N[:METRIC[:min|max]], epoch:all|N, every:K. "
            "Repeat --keep to add rules (merged as if joined by commas). Given, they replace the `keep` of "
            "CKPTKEEPER_KEEP and of --config as a whole (flags over environment over config file).",
        ),
        click.option(
            "--keep-weights",
            multiple=True,
            callback=_check_keep,
            metavar="RULES",
            help="Rules, as for --keep, for checkpoints to keep as weights only: what only these keep loses its "
            "resume state (optimizer, scheduler, RNG states) and keeps everything needed to load the model.",
        ),
        click.option(
            "--min-free",
            metavar="SIZE|PERCENT",
            callback=_check_floor,
            help="Free space to keep on each filesystem holding a run (50G, 40Gi, 10%), on top of the next save of "
            "each run still training. Below it the disk is under pressure: reported, and with "
            "--keep-under-pressure acted on.",
        ),
        click.option(
            "--keep-under-pressure",
            multiple=True,
            callback=_check_keep,
            metavar="RULES",
            help="Rules, as for --keep, that still keep checkpoints under disk pressure: what --keep keeps and these "
            "do not is released (removed, or archived with --archive-to) one at a time, as few as needed to meet "
            "--min-free. Protected checkpoints are never released.",
        ),
        click.option(
            "--protect-trainer-best/--no-protect-trainer-best",
            default=None,
            help="Always keep the checkpoint the Trainer calls best (default: on).",
        ),
    ]


def _metric_options() -> list[Callable[[F], F]]:
    return [
        click.option(
            "--metric",
            "metrics",
            multiple=True,
            callback=_check_metrics,
            metavar="NAME=SOURCE#POINTER",
            help="A metric an evaluation job writes, for rules to use by NAME (best:3:NAME). SOURCE: file:PATH (a "
            "JSON file inside each checkpoint) or lm-eval:DIR (lm_eval's --output_path); POINTER: a JSON Pointer, "
            "e.g. hellaswag=lm-eval:./evals#/results/hellaswag/acc_norm,none. Repeatable.",
        ),
        click.option(
            "--await",
            "await_",
            multiple=True,
            metavar="NAME[:TIMEOUT]",
            help="Keep each complete checkpoint until its metric NAME arrives, or until TIMEOUT (default 24h; 90s, "
            "15m, 2h, 1h30m) has passed since it was written. Repeatable.",
        ),
    ]


def _path_options() -> list[Callable[[F], F]]:
    return [
        click.option(
            "--config",
            "-c",
            "config_file",
            type=click.Path(path_type=Path, dir_okay=False),
            help="YAML or TOML file with any of these settings; flags override it.",
        ),
        click.option(
            "--archive-to",
            metavar="DIR|URL",
            help="Move removed checkpoints here (keeping the run's path) instead of deleting them: a directory, or "
            "an object store URL such as s3://bucket/prefix (pip install 'ckptkeeper[s3]'; credentials and endpoint "
            "from the AWS environment variables and config files).",
        ),
        click.option(
            "--archive-option",
            "archive_options",
            multiple=True,
            metavar="KEY=VALUE",
            callback=lambda _ctx, _param, value: list(value) or None,
            help="A storage option for an object store --archive-to, passed to fsspec (repeatable).",
        ),
        click.option(
            "--state-dir",
            type=click.Path(path_type=Path, file_okay=False),
            help="Where the lock, journal and trash live. Default: ROOT/_ckptkeeper",
        ),
        click.option("--max-depth", type=int, help="How deep below ROOT to look for run directories. Default: 4"),
        click.option(
            "--settle",
            type=float,
            metavar="SECONDS",
            help="Treat a checkpoint changed less than this long ago as incomplete. Default: 0 (watch: 2)",
        ),
        click.option(
            "--stale-after",
            metavar="DURATION",
            callback=_check_duration,
            help="Report an incomplete checkpoint unchanged this long (90s, 15m, 2h, 1h30m, 3d) as stale, left by a "
            "crash: a resume starts from the highest step, complete or not. Never removed. Default: 1h",
        ),
    ]


def _settings(flags: dict[str, Any]) -> Settings:
    from ckptkeeper.config import ConfigError, load_settings

    config_file = flags.pop("config_file", None)
    try:
        return load_settings(config_file, flags)
    except ConfigError as e:
        raise ConfigProblem(str(e)) from None


def _root(settings: Settings, config: str = "--config") -> Path:
    """ROOT, from wherever it was given; `config` names the config file as the command takes it."""
    if settings.root is None:
        raise click.UsageError(
            f"missing ROOT: the directory that holds your runs (or CKPTKEEPER_ROOT, or `root:` in {config})"
        )
    return settings.root


@contextlib.contextmanager
def _domain_errors() -> Iterator[None]:
    """The library's domain errors, as click errors with their exit codes. Nothing else is decided here."""
    from ckptkeeper.engine import NotSupported, RetentionRefused, StateDirUnusable
    from ckptkeeper.layout import LayoutError
    from ckptkeeper.state import LockHeld

    try:
        yield
    except RetentionRefused as e:
        raise Refused(f"refused: {e}") from None
    except (LayoutError, NotSupported) as e:
        raise ConfigProblem(str(e)) from None
    except LockHeld as e:
        raise Locked(str(e)) from None
    except StateDirUnusable as e:
        raise Failed(str(e)) from None


def _pipeline(settings: Settings, dry_run: bool = False) -> Pipeline:
    from ckptkeeper.engine import Pipeline

    return Pipeline.checked(
        _root(settings),
        settings.policy(),
        settings.scan_options(),
        settings.state_dir,
        settings.archive_to,
        dry_run=dry_run,
        archive_options=settings.archive_option_pairs(),
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, "--version", "-V", prog_name="ckptkeeper")
def main() -> None:
    """Keep the checkpoints that matter and delete or archive the rest.

    \b
    Example:
        ckptkeeper plan  ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper prune ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper watch ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper demo
    """


for _command in PIN_COMMANDS:  # pin, unpin, pins (cli_pins.py)
    main.add_command(_command)


@main.command(epilog=EXIT_CODES_HELP)
@policy_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON for scripts.")
def plan(as_json: bool, **flags: Any) -> None:
    """Show what the rules keep and remove, and why. Changes nothing.

    \b
    Example:
        ckptkeeper plan ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper plan ./outputs --keep best:3:accuracy,last:2 --json
    """
    from ckptkeeper.render import plan_json, plan_text, refusal_text

    settings = _settings(flags)
    with _domain_errors():
        pipeline = _pipeline(settings)
        result = pipeline.survey(now=time.time())  # `now` makes --settle apply
    root, archive_to = str(pipeline.root), pipeline.layout.archive
    sources = pipeline.scan_options.metrics
    if as_json:
        printed = plan_json(root, pipeline.policy, result.plan, result.warnings, archive_to, sources)
        _echo(json.dumps(printed, indent=2))
    else:
        plan, max_depth = result.plan, settings.max_depth
        _echo(plan_text(root, pipeline.policy, plan, result.warnings, archive_to, max_depth, _palette(), sources))
    if result.plan.refused_runs:
        raise Refused(refusal_text(result.plan, "nothing would be removed"))


@main.command(epilog=EXIT_CODES_HELP)
@policy_options
@click.option("--dry-run", "-n", is_flag=True, default=None, help="Print what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the actions and the summary as JSON, once done.")
def prune(as_json: bool, **flags: Any) -> None:
    """Apply the rules once: remove (delete or archive) every checkpoint no rule or protection keeps.

    \b
    Example:
        ckptkeeper prune ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper prune ./outputs --keep best:3:accuracy,last:2 --archive-to /mnt/archive
        ckptkeeper prune ./outputs --config configs/hf-best-last-epoch.yaml --dry-run
    """
    from ckptkeeper.render import QuietPruneReport, TextPruneReport, prune_json, refusal_text

    settings = _settings(flags)
    dry_run = bool(settings.dry_run)
    with _domain_errors():
        pipeline = _pipeline(settings, dry_run=dry_run)
        pipeline.check_destination()
        if not as_json and sys.stderr.isatty():
            pipeline.progress = _terminal_bar
        archive_to = pipeline.layout.archive
        report = (
            QuietPruneReport()
            if as_json
            else TextPruneReport(_echo, pipeline.policy, pipeline.root, archive_to, _palette())
        )
        result = pipeline.prune(now=time.time(), report=report)  # `now` makes --settle apply
    if as_json:
        _echo(json.dumps(prune_json(str(pipeline.root), pipeline.policy, result, dry_run, archive_to), indent=2))
    if result.plan.refused_runs:
        raise Refused(refusal_text(result.plan, "nothing was removed"))
    if isinstance(report, TextPruneReport):
        report.finished(result, dry_run, settings.max_depth, pipeline.archive_moves())
    if result.errors:
        raise Failed(f"{count(len(result.errors), 'checkpoint')} could not be removed (see the FAILED lines above)")
    problem = _floor_problem(result)
    if problem:  # a trainer's low-disk hook must know that saving may still fail
        raise Failed(problem)


def _terminal_bar(run: str, checkpoint: Path) -> ProgressSink:
    """A progress bar on stderr while `prune` on a terminal uploads a checkpoint to an object store."""
    from ckptkeeper.destination import tree_size
    from ckptkeeper.progress import TerminalBar

    what = f"{run}/{checkpoint.name}" if run != "." else checkpoint.name
    return TerminalBar(f"uploading {what}", tree_size(str(checkpoint)))


def _floor_problem(result: PassResult) -> str | None:
    """Why the --min-free floor may not be met after this prune, if it may not: it cannot be, or a removal the
    verdict counted on did not go through (changed since the plan, or cut short by a stop)."""
    from ckptkeeper.model import OutcomeKind
    from ckptkeeper.render import shown

    unmet = [p for p in result.plan.pressure if p.unmet]
    if unmet:
        where = ", ".join(shown(p.disk.where) for p in unmet)
        return f"the --min-free floor cannot be met on {where} (see the disk line above)"
    undone = [o for o in result.outcomes if o.action in (OutcomeKind.SKIPPED, OutcomeKind.STOPPED)]
    if undone and any(p.under for p in result.plan.pressure):
        return (
            f"the --min-free floor may not be met: {count(len(undone), 'removal')} it counted on did not go through "
            "(see the skipped or stopped lines above); run prune again"
        )
    return None


@main.command(epilog=EXIT_CODES_HELP)
@policy_options
@click.option("--rescan-interval", type=float, metavar="SECONDS", help="Full rescan as a safety net. Default: 60")
@click.option(
    "--poll",
    type=float,
    metavar="SECONDS",
    help="Watch by polling every SECONDS instead of inotify (NFS, Lustre, FUSE: inotify sees nothing there).",
)
@click.option(
    "--exit-when-done",
    is_flag=True,
    default=None,
    help="Exit once every run's newest checkpoint says training stopped and it is pruned: 0, or 3 when a run's "
    "retention was refused.",
)
@click.option(
    "--standby",
    is_flag=True,
    default=None,
    help="When another instance holds the root's lock (one sidecar per node on a shared volume), wait and take "
    "over when it stops, instead of exiting 4.",
)
@click.option("--dry-run", "-n", is_flag=True, default=None, help="Log what would be removed; remove nothing.")
@click.option("--grace", type=float, metavar="SECONDS", help="How long a stop (SIGTERM) may take. Default: 10")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="text (default) or json lines.")
@click.option("--metrics-port", type=int, metavar="PORT", help="Serve Prometheus /metrics and /healthz on PORT.")
@click.option("--metrics-host", metavar="HOST", help="Address for --metrics-port. Default: 127.0.0.1")
@click.option("--verbose", "-v", "verbose", count=True, help="More detail (debug).")
@click.option("--quiet", "-q", is_flag=True, help="Only warnings and errors.")
def watch(verbose: int, quiet: bool, **flags: Any) -> None:
    """Watch ROOT and apply the rules as each checkpoint completes, until stopped.

    Runs beside a training job (another terminal, a tmux pane, a sidecar container). A checkpoint counts
    once it is complete (trainer_state.json written, weights whole, no save in progress) and nothing in it
    changed for --settle seconds. Logs go to stderr.

    \b
    Example:
        ckptkeeper watch ./outputs --keep best:1,last:5,epoch:all
        ckptkeeper watch /mnt/nfs/outputs --keep last:3 --poll 5
        ckptkeeper watch /outputs --config /etc/ckptkeeper.yaml --exit-when-done --log-format json
    """
    from ckptkeeper.logs import configure_logging
    from ckptkeeper.watch import Daemon

    settings = _settings(flags)
    root = _root(settings)
    configure_logging(settings.log_format, -1 if quiet else verbose)
    options = _watch_options(settings)
    with _domain_errors():  # a root that exists has its paths checked now; one awaited, once it appears
        if root.exists() and not root.is_dir():
            raise ConfigProblem(f"root {root} is not a directory")
        daemon = Daemon(root, settings.policy(), settings.state_dir, options, *settings.archive())
    daemon.install_signal_handlers()
    try:
        with _domain_errors():
            code = daemon.run()
    except OSError as e:
        # e.g. a read-only root: the state directory cannot be created there. A message, not a traceback.
        where = f" ({e.filename})" if e.filename else ""
        raise Failed(f"cannot watch {daemon.root}: {e.strerror or e}{where}") from None
    except KeyboardInterrupt:
        if not daemon.stop_event.is_set():
            raise
        return
    if code:
        sys.exit(code)


def _watch_options(settings: Settings) -> WatchOptions:
    from ckptkeeper.watch import WatchOptions

    return WatchOptions(
        settle=settings.scan_options(default_settle=2.0).settle,
        stale_after=settings.scan_options().stale_after,
        metrics=settings.metric_specs(),
        max_depth=settings.max_depth,
        rescan_interval=settings.rescan_interval,
        poll=settings.poll,
        dry_run=settings.dry_run,
        exit_when_done=settings.exit_when_done,
        grace=settings.grace,
        metrics_port=settings.metrics_port,
        metrics_host=settings.metrics_host,
        standby=settings.standby,
    )


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("root", required=False, type=click.Path(path_type=Path))
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False), help="Default: ROOT/_ckptkeeper")
@click.option("--run", "run_path", metavar="RUN", help="Only this run (as plan names it: exp1, sweep/lr-1e-4, .).")
@click.option("--since", metavar="WHEN", help="Only what happened since: a duration (2h, 1h30m, 3d) or a date.")
@click.option("--json", "as_json", is_flag=True, help="Print the events and totals as JSON for scripts.")
def history(root: Path | None, state_dir: Path | None, run_path: str | None, since: str | None, as_json: bool) -> None:
    """What ckptkeeper removed, archived or made weights only under ROOT: when, why, and what it freed.

    Reads the journal in the state directory; changes nothing (a read-only root is fine).

    \b
    Example:
        ckptkeeper history ./outputs
        ckptkeeper history ./outputs --run exp1 --since 2h
    """
    import datetime as dt

    from ckptkeeper.history import HistoryError, history_json, history_text, parse_since, read_journal, select
    from ckptkeeper.layout import default_state_dir
    from ckptkeeper.model import root_name

    settings = _settings({"root": root, "state_dir": state_dir})
    top = _root(settings, config="the $CKPTKEEPER_CONFIG file")
    journal_path = (settings.state_dir or default_state_dir(top)) / "journal.jsonl"
    try:
        cutoff = parse_since(since, dt.datetime.now().astimezone()) if since is not None else None
    except HistoryError as e:
        raise click.BadParameter(str(e).removeprefix("invalid --since "), param_hint="'--since'") from None
    if not top.is_dir():
        raise ConfigProblem(f"root {top} is not a directory")
    try:
        journal = read_journal(journal_path)
    except FileNotFoundError:
        _echo(f"History of {top}: nothing yet (no journal at {journal_path}; pass --state-dir if it is elsewhere).")
        return
    except OSError as e:
        raise Failed(f"cannot read the journal {journal_path}: {e.strerror or e}") from None
    events = select(journal.events, run_path, cutoff, root_name(top.resolve()))  # as prune named it
    if as_json:
        _echo(json.dumps(history_json(top, journal_path, journal, events), indent=2))
    else:
        _echo(history_text(top, journal_path, journal, events))


@main.command()
@click.option(
    "--keep",
    "-k",
    multiple=True,
    default=["best:1,last:5"],
    show_default=True,
    callback=_check_keep,
    metavar="RULES",
    help="Keep rules, as for watch; repeat --keep to add rules (merged as if joined by commas).",
)
@click.option(
    "--keep-weights",
    multiple=True,
    callback=_check_keep,
    metavar="RULES",
    help="Rules for checkpoints kept as weights only, as for watch. Default: epoch:all with the default --keep, "
    "none with a --keep of your own.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Keep the demo run in DIR/outputs, which must be absent or empty (the demo removes nothing of yours).",
)
@click.option(
    "--pace",
    type=click.FloatRange(min=0),
    default=0.13,
    show_default=True,
    metavar="SECONDS",
    help="Seconds per simulated training step.",
)
@click.pass_context
def demo(ctx: click.Context, keep: str, keep_weights: str | None, directory: Path | None, pace: float) -> None:
    """Watch a simulated Trainer run live: each checkpoint kept or deleted as it completes, then what is left.

    \b
    Example:
        ckptkeeper demo
    """
    from ckptkeeper.demo import DemoDirError, run_demo

    try:
        if keep_weights is None:  # the default policy shows weights-only milestones; rules of your own, only those
            default = ctx.get_parameter_source("keep") is click.core.ParameterSource.DEFAULT
            keep_weights = "epoch:all" if default else ""
        run_demo(keep, directory, click.echo, pace, keep_weights)
    except DemoDirError as e:
        raise click.BadParameter(str(e), param_hint="'--dir'") from None


@main.group(epilog=EXIT_CODES_HELP)
def archive() -> None:
    """List or restore checkpoints archived to an object store (--archive-to s3://...).

    \b
    Example:
        ckptkeeper archive ls s3://my-bucket/runs
        ckptkeeper archive restore s3://my-bucket/runs/exp1/checkpoint-500 ./outputs/exp1
    """


def _store_options(values: tuple[str, ...]) -> dict[str, Any]:
    from ckptkeeper.config import ConfigError, parse_archive_options

    try:
        return parse_archive_options(values)
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="'--archive-option'") from None


_ARCHIVE_OPTION = click.option(
    "--archive-option",
    "archive_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="A storage option passed to fsspec (repeatable), as for prune and watch.",
)


@archive.command("ls", epilog=EXIT_CODES_HELP)
@click.argument("url")
@_ARCHIVE_OPTION
def archive_ls(url: str, archive_options: tuple[str, ...]) -> None:
    """Every checkpoint archived below URL: run, step, size, when, and whether it is complete.

    \b
    Example:
        ckptkeeper archive ls s3://my-bucket/runs
    """
    from ckptkeeper.archives import archive_table, list_archive
    from ckptkeeper.destination import DestinationError, ObjectStore
    from ckptkeeper.urls import is_url, url_problem

    problem = (
        url_problem(url, writing=False) if is_url(url) else "expected an object store URL such as s3://bucket/prefix"
    )
    if problem:
        raise ConfigProblem(f"{url}: {problem}")
    store = ObjectStore(url.rstrip("/"), _store_options(archive_options))
    try:
        store.check()
        entries = list_archive(store, warn=lambda message: _echo(f"warning: {message}", err=True))
        _echo(archive_table(url, entries))
    except DestinationError as e:
        raise Failed(f"cannot list {url}: {e}") from None


@archive.command("restore", epilog=EXIT_CODES_HELP)
@click.argument("url")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@_ARCHIVE_OPTION
def archive_restore(url: str, directory: Path, archive_options: tuple[str, ...]) -> None:
    """Bring URL/RUN/checkpoint-N back into DIRECTORY (as DIRECTORY/checkpoint-N), verified against its manifest.

    \b
    Example:
        ckptkeeper archive restore s3://my-bucket/runs/exp1/checkpoint-500 ./outputs/exp1
    """
    from ckptkeeper.archives import restore, restored_text
    from ckptkeeper.destination import DestinationError, ObjectStore
    from ckptkeeper.urls import is_url, url_problem

    problem = (
        url_problem(url, writing=False) if is_url(url) else "expected an object store URL such as s3://bucket/prefix"
    )
    if problem:
        raise ConfigProblem(f"{url}: {problem}")
    try:
        ObjectStore(url, {}).check()
        target, manifest = restore(url, _store_options(archive_options), directory)
    except DestinationError as e:
        raise Failed(f"cannot restore {url}: {e}") from None
    _echo(restored_text(target, manifest, url))


def entry() -> None:
    main(prog_name="ckptkeeper")


if __name__ == "__main__":
    sys.exit(main())
