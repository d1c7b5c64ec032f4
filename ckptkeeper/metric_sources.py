"""Named metrics read from what evaluation jobs leave (`--metric`), joined to each checkpoint's own metrics.

`MetricSources` is owned by the thread that owns the `Pipeline` (a command's, or the daemon's main loop). It
reads only: a results file is opened without following a link, only if it is a regular file of at most
`MAX_RESULTS_BYTES`, and it is read again only when its lstat (inode, size, mtime, ctime) changed. No content
of any results file can raise out of here: whatever cannot be read or understood means the checkpoint lacks
the metric, with the reason kept for the plan to show.

- `file:PATH`: PATH inside each complete checkpoint, every component opened without following links.
- `lm-eval:DIR`: lm-evaluation-harness's `--output_path` tree (`tests/fixtures/lm-eval/README.md`). Results
  files are found by content (`results`, `config.model_args`, `lm_eval_version`), never by directory name,
  and tied to the checkpoint the harness recorded (`model_args.peft`, else `pretrained`): an absolute path by
  identity (device, inode: through a link or `..` it is still the same checkpoint), a relative one by its
  trailing components when they name exactly one checkpoint below the root. Of several results for one
  checkpoint, the newest (`date`) that holds the value wins. An empty or unparsable file is an evaluation
  still being written (the harness writes in place): it counts for nothing until it parses.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ckptkeeper.metric_specs import MetricSpec, as_number, format_pointer, resolve
from ckptkeeper.model import Checkpoint, Run
from ckptkeeper.regular import NotRegular, open_regular

MAX_RESULTS_BYTES = 64 << 20  # a results file is ~10 kB; a bigger "results file" is not read into memory
MAX_LM_EVAL_DEPTH = 8  # DIR/<model dir>/results_<ts>.json is depth 2; deeper directories are warned of
# An evaluation that started this long before its checkpoint was written is of an earlier checkpoint of that
# name (a run started again in the same output_dir); the allowance covers an eval host's clock a little behind.
EVALUATED_BEFORE_ALLOWANCE = 60.0
FileKey = tuple[int, int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns
Identity = tuple[int, int]


def _key(st: os.stat_result) -> FileKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Unreadable(Exception):
    """A results file that cannot be used (yet); the message says why, for the plan."""


def _read_fd(fd: int, shown: str) -> object:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Unreadable(f"{shown} is not a regular file")
    if st.st_size > MAX_RESULTS_BYTES:
        raise Unreadable(f"{shown} is larger than {MAX_RESULTS_BYTES >> 20} MiB")
    if st.st_size == 0:
        raise Unreadable(f"{shown} is empty (being written?)")
    with os.fdopen(os.dup(fd), "rb") as f:
        raw = f.read(MAX_RESULTS_BYTES + 1)
    try:
        return json.loads(raw)
    except RecursionError:
        raise Unreadable(f"{shown} is nested too deeply") from None
    except ValueError:  # also UnicodeDecodeError, and an int of more digits than int() converts
        raise Unreadable(f"{shown} is not valid JSON (being written?)") from None


def read_json_at(directory: str, relative: str) -> tuple[FileKey, object]:
    """The JSON document at `relative` below `directory`, no component followed through a link."""
    parts = relative.split("/")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        try:
            file_fd = open_regular(parts[-1], fd)
        except NotRegular as e:
            if stat.S_ISLNK(e.mode):
                raise Unreadable(f"{relative} is a symlink (not followed)") from None
            raise Unreadable(f"{relative} is not a regular file") from None
        try:
            return _key(os.fstat(file_fd)), _read_fd(file_fd, relative)
        finally:
            os.close(file_fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Found:
    """A metric's value for one checkpoint, where it came from; or why there is none."""

    value: float | None
    origin: str | None = None
    problem: str | None = None
    present: bool = True  # the pointer reached something (a number or not): this evaluation has the metric

    @property
    def unreachable(self) -> bool:
        """A results file was read, and the pointer reaches nothing in it (a wrong pointer, or another task)."""
        return not self.present and self.origin is not None


def value_in(document: object, spec: MetricSpec, shown: str) -> Found:
    try:
        raw = resolve(document, spec.pointer)
    except KeyError:
        return Found(None, shown, f"{shown} has no {format_pointer(spec.pointer)}", present=False)
    number = as_number(raw)
    if number is None:
        return Found(None, shown, f"{format_pointer(spec.pointer)} in {shown} is not a finite number")
    return Found(number, shown)


class FileSource:
    """`file:PATH` metrics: PATH inside each checkpoint. Remembers each file's values by its lstat."""

    def __init__(self, location: str, specs: Sequence[MetricSpec]) -> None:
        self.location = location
        self.specs = tuple(specs)
        self._seen: dict[str, dict[str, tuple[FileKey, dict[str, Found]]]] = {}  # run dir -> checkpoint -> read

    def values(self, run_dir: str, name: str) -> dict[str, Found]:
        checkpoint_dir = os.path.join(run_dir, name)
        seen = self._seen.setdefault(run_dir, {})
        try:
            st = os.lstat(os.path.join(checkpoint_dir, self.location))
        except (OSError, ValueError):
            seen.pop(name, None)
            return self._all(Found(None, None, f"no {self.location} in the checkpoint", present=False))
        key = _key(st)
        if not stat.S_ISREG(st.st_mode):  # never opened: a FIFO's writer or a device would notice
            kind = "a symlink (not followed)" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            return self._all(Found(None, self.location, f"{self.location} is {kind}"))
        held = seen.get(name)
        if held is not None and held[0] == key:
            return held[1]
        try:
            key, document = read_json_at(checkpoint_dir, self.location)
            found = {s.name: value_in(document, s, self.location) for s in self.specs}
        except Unreadable as e:
            found = self._all(Found(None, self.location, str(e)))
        except OSError as e:
            found = self._all(Found(None, self.location, f"cannot read {self.location}: {e.strerror or e}"))
        seen[name] = (key, found)
        return found

    def _all(self, found: Found) -> dict[str, Found]:
        return {s.name: found for s in self.specs}

    def forget_missing(self, run_dir: str, present: set[str]) -> None:
        seen = self._seen.get(run_dir, {})
        for gone in seen.keys() - present:
            del seen[gone]


@dataclass(frozen=True)
class Evaluation:
    """One lm-eval results file: the model path it records, when it ran, and the values of the metrics."""

    file: str
    model_path: str
    date: float
    values: dict[str, Found] = field(default_factory=dict)


def _model_args(document: dict[str, object]) -> dict[str, object] | None:
    config = document.get("config")
    args = config.get("model_args") if isinstance(config, dict) else None
    if isinstance(args, str):  # older harness versions record the CLI string: pretrained=...,dtype=...
        pairs = (part.partition("=") for part in args.split(","))
        return {k.strip(): v.strip() for k, eq, v in pairs if eq}
    return args if isinstance(args, dict) else None


def evaluation_of(document: object, file: str, mtime: float, specs: Sequence[MetricSpec]) -> Evaluation | None:
    """The evaluation a results file records, or None when the JSON is not an lm-eval results file."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), dict):
        return None
    if "lm_eval_version" not in document:
        return None
    args = _model_args(document)
    if args is None:
        return None
    # The model the harness names its output after: the first of these it was given (an adapter or a delta
    # is the checkpoint evaluated, not its base).
    named = (args.get("peft"), args.get("delta"), args.get("pretrained"))
    path = next((p for p in named if isinstance(p, str) and p.strip()), None)
    if path is None:
        return None
    date = as_number(document.get("date"))
    values = {s.name: value_in(document, s, file) for s in specs}
    return Evaluation(file, path, mtime if date is None else date, values)


class LmEvalSource:
    """`lm-eval:DIR` metrics: an index of DIR's results files, each read again only when its lstat changed."""

    def __init__(self, directory: str, specs: Sequence[MetricSpec]) -> None:
        self.directory = directory
        self.specs = tuple(specs)
        self._files: dict[str, tuple[FileKey, Evaluation | None]] = {}
        self.reads = 0  # files read so far (the benchmark and tests count them)
        self.warnings: list[str] = []  # of the last refresh
        # Each recorded model path as of the last refresh: its (device, inode) (None if it leads nowhere) and
        # whether its real path lies outside the root; stat'ed once per pass, not once per run.
        self.located: dict[str, tuple[Identity | None, bool]] = {}

    def refresh(self) -> None:
        """Look at DIR again: new and changed files are read, vanished ones forgotten. When DIR itself cannot be
        listed (moved, unmounted, no permission), what was read before is kept and a warning says so: results
        that vanish with their directory must not make every checkpoint look unevaluated."""
        self.located.clear()
        self.warnings = []
        try:
            listed = list(self._walk())
        except OSError as e:
            self.warnings.append(
                f"cannot list the lm-eval directory {self.directory}: {e.strerror or e}; "
                f"using the {len(self.evaluations())} results read from it before"
            )
            return
        present: set[str] = set()
        for path, st in listed:
            present.add(path)
            key = _key(st)
            held = self._files.get(path)
            if held is not None and held[0] == key:
                continue
            self._files[path] = (key, self._read(path, st))
        for gone in self._files.keys() - present:
            del self._files[gone]

    def _read(self, path: str, st: os.stat_result) -> Evaluation | None:
        self.reads += 1
        try:
            fd = open_regular(path)
        except OSError:  # gone, or not a regular file any more (NotRegular)
            return None
        try:
            document = _read_fd(fd, path)
        except (Unreadable, OSError):
            return None  # being written, or not ours to understand: nothing, until it changes
        finally:
            os.close(fd)
        return evaluation_of(document, path, st.st_mtime, self.specs)

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        """Every regular `*.json` below DIR (links not followed); OSError if DIR itself cannot be listed."""
        with os.scandir(self.directory) as it:
            pending = [(list(it), 0)]
        while pending:
            entries, depth = pending.pop()
            for e in entries:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if depth >= MAX_LM_EVAL_DEPTH:
                        self.warnings.append(f"{e.path!r} is nested more than {MAX_LM_EVAL_DEPTH} deep: not searched")
                        continue
                    try:
                        with os.scandir(e.path) as it:
                            pending.append((list(it), depth + 1))
                    except OSError:
                        continue  # gone, or not ours to read: its results count for nothing
                elif stat.S_ISREG(st.st_mode) and e.name.endswith(".json"):
                    yield e.path, st

    def evaluations(self) -> list[Evaluation]:
        return [e for _, e in self._files.values() if e is not None]


@dataclass
class Ties:
    """Which checkpoint each evaluation is of, and what could not be tied (warnings for the plan)."""

    by_checkpoint: dict[tuple[str, str], list[Evaluation]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


Where = tuple[str, str]  # (run path, checkpoint name)


def tie(source: LmEvalSource, root: Path, identities: dict[Identity, Where], known: dict[str, set[str]]) -> Ties:
    """Tie each evaluation of `source` to a checkpoint below the root."""
    ties = Ties()
    real_root = os.path.realpath(root)
    for ev in source.evaluations():
        where = _tied(ev.model_path, real_root, identities, known, source.located)
        if isinstance(where, str):
            if where:
                ties.warnings.append(f"{ev.file}: {where}; ignored")
            continue
        ties.by_checkpoint.setdefault(where, []).append(ev)
    return ties


def _tied(
    model_path: str,
    real_root: str,
    identities: dict[Identity, Where],
    known: dict[str, set[str]],
    located: dict[str, tuple[Identity | None, bool]],
) -> Where | str:
    """The checkpoint, or why none ("" for a checkpoint not (or no longer) there: nothing to say)."""
    path = model_path.rstrip("/")
    if os.path.isabs(path):
        if path not in located:
            located[path] = _locate(path, real_root)
        found, outside = located[path]
        if found is not None and found in identities:
            return identities[found]  # by identity first: a bind mount of the root is no outside
        return f"evaluated {model_path!r}, which is outside the root {real_root}" if outside else ""
    try:
        parts = [p for p in os.path.normpath(path).split("/") if p not in ("", ".", "..")]
    except ValueError:
        parts = []
    if not parts or "\0" in path:
        return f"evaluated {model_path!r}, which names no checkpoint"
    name, above = parts[-1], parts[:-1]
    matches = [(run, name) for run, names in known.items() if name in names and _ends_with(real_root, run, above)]
    if len(matches) > 1:
        shown = ", ".join(f"{run}/{name}" for run, name in sorted(matches))
        return f"evaluated the relative path {model_path!r}, which names {len(matches)} checkpoints ({shown})"
    return matches[0] if matches else ""


def _locate(path: str, real_root: str) -> tuple[Identity | None, bool]:
    """(device, inode) of the directory `path` leads to, through links (None if none), and whether its real
    path lies outside the root. A path no filesystem can hold (a NUL, a lone surrogate) leads nowhere."""
    try:
        real = os.path.realpath(path)
        st = os.stat(path)
    except (OSError, ValueError):
        try:
            real = os.path.realpath(path)
        except (OSError, ValueError):
            return None, True
        return None, not _below(real, real_root)
    return (st.st_dev, st.st_ino), not _below(real, real_root)


def _below(real: str, real_root: str) -> bool:
    return real == real_root or real.startswith(real_root.rstrip("/") + "/")


def _ends_with(real_root: str, run: str, components: list[str]) -> bool:
    """The run directory's path (the root's own path included, so `run/checkpoint-240` names the root's own
    run when the root is `run`) ends with `components`."""
    if not components:
        return True
    have = [p for p in real_root.split("/") if p] + ([] if run == "." else run.split("/"))
    return len(components) <= len(have) and have[-len(components) :] == components


def newest_values(evaluations: Sequence[Evaluation], specs: Sequence[MetricSpec]) -> dict[str, Found]:
    """For each metric, the newest evaluation that holds it (by `date`, then file name); else why none."""
    found: dict[str, Found] = {}
    ordered = sorted(evaluations, key=lambda e: (e.date, e.file), reverse=True)
    for spec in specs:
        holding = [e.values[spec.name] for e in ordered if e.values[spec.name].present]
        if holding:
            found[spec.name] = holding[0]
        elif ordered:
            found[spec.name] = ordered[0].values[spec.name]
        else:
            found[spec.name] = Found(None, None, f"not evaluated yet (no results for it in {spec.location})")
    return found


def _checkpoint_names(directory: str) -> set[str]:
    from ckptkeeper.scan import checkpoint_step

    try:
        with os.scandir(directory) as it:
            return {e.name for e in it if checkpoint_step(e.name) is not None}
    except OSError:
        return set()


def _of_this_checkpoint(ev: Evaluation, c: Checkpoint) -> bool:
    """The evaluation started after this checkpoint was written (its trainer_state.json, which the Trainer writes
    last and nothing rewrites): one that started before is of an earlier checkpoint of that name."""
    written = c.state_written_at if c.state_written_at is not None else c.written_at
    return written is None or ev.date >= written - EVALUATED_BEFORE_ALLOWANCE


def _older_than(c: Checkpoint) -> Found:
    """Why a checkpoint whose every evaluation started before it was written lacks the metric."""
    return Found(None, None, f"not evaluated yet (the results for {c.name} are older than it: an earlier one?)", False)


class MetricSources:
    """Every `--metric` of a pipeline, joined to the checkpoints of each scanned run. Owned by one thread."""

    def __init__(self, specs: Sequence[MetricSpec], root: Path) -> None:
        self.specs = tuple(specs)
        self.root = root
        by_file: dict[str, list[MetricSpec]] = {}
        by_dir: dict[str, list[MetricSpec]] = {}
        for s in self.specs:
            (by_file if s.kind == "file" else by_dir).setdefault(s.location, []).append(s)
        self.files = [FileSource(loc, specs) for loc, specs in by_file.items()]
        self.lm_evals = [LmEvalSource(loc, specs) for loc, specs in by_dir.items()]
        self.known: dict[str, set[str]] = {}  # run path -> checkpoint names, as last scanned
        self.warnings: list[str] = []  # of the last `attach`
        # (run, checkpoint) -> (the checkpoint as scanned, the values joined, the checkpoint with them): the same
        # object again while nothing changed, so the daemon still sees a quiet run as unchanged.
        self._joined: dict[tuple[str, str], tuple[Checkpoint, tuple[tuple[str, Found], ...], Checkpoint]] = {}

    @property
    def directories(self) -> list[Path]:
        """The lm-eval directories (never scanned as runs)."""
        return [Path(s.directory) for s in self.lm_evals]

    def refresh(self, run_dirs: dict[str, str] | None = None) -> None:
        """Look at every lm-eval directory again (once per pass: each run of a pass is then joined from it).
        `run_dirs` (run path -> directory): every run of the root, whose checkpoint names are listed now, so
        that a relative recorded path is judged against all of them even when runs are scanned one by one."""
        for run, directory in (run_dirs or {}).items():
            self.known[run] = _checkpoint_names(directory)
        self.warnings = []
        for source in self.lm_evals:
            source.refresh()
            self.warnings += source.warnings

    def forget(self, run: str) -> None:
        """A run that is gone: none of its checkpoints can be named by a relative path any more."""
        self.known.pop(run, None)

    def attach(self, runs: Sequence[Run], run_dir_of: dict[str, str]) -> list[Run]:
        """The runs with each complete checkpoint's named metrics joined to its own, from the lm-eval directories
        as last refreshed; `run_dir_of` gives each run's directory (absolute) by its path."""
        for run in runs:
            self.known[run.path] = {c.name for c in run.checkpoints}
        self._joined = {k: v for k, v in self._joined.items() if k[1] in self.known.get(k[0], ())}
        identities = {c.identity: (run.path, c.name) for run in runs for c in run.checkpoints if c.identity is not None}
        evaluated: dict[tuple[str, str], dict[str, Found]] = {}
        older: list[str] = []
        for source in self.lm_evals:
            ties = tie(source, self.root, identities, self.known)
            self.warnings = list(dict.fromkeys([*self.warnings, *ties.warnings]))
            for run in runs:
                for c in run.checkpoints:
                    tied = ties.by_checkpoint.get((run.path, c.name), [])
                    current = [e for e in tied if _of_this_checkpoint(e, c)]
                    found = newest_values(current, source.specs)
                    if tied and not current:
                        found = dict.fromkeys(found, _older_than(c))
                        older.append(f"{run.label}/{c.name}" if run.path != "." else c.name)
                    evaluated.setdefault((run.path, c.name), {}).update(found)
        if older:
            self.warnings.append(
                f"the lm-eval results of {', '.join(older)} started before the checkpoint was written, so they are of "
                "an earlier checkpoint of that name and not used (or the checkpoints were copied without their times)"
            )
        return [self._joined_run(run, run_dir_of[run.path], evaluated) for run in runs]

    def _joined_run(self, run: Run, run_dir: str, evaluated: dict[tuple[str, str], dict[str, Found]]) -> Run:
        checkpoints = []
        for c in run.checkpoints:
            if not c.complete:
                checkpoints.append(c)
                continue
            found = dict(evaluated.get((run.path, c.name), {}))
            for source in self.files:
                found.update(source.values(run_dir, c.name))
            checkpoints.append(self._joined_checkpoint(run.path, c, found))
        for source in self.files:
            source.forget_missing(run_dir, {c.name for c in run.checkpoints})
        return replace(run, checkpoints=tuple(checkpoints))

    def _joined_checkpoint(self, run: str, c: Checkpoint, found: dict[str, Found]) -> Checkpoint:
        values = tuple(sorted(found.items()))
        held = self._joined.get((run, c.name))
        if held is not None and held[0] is c and held[1] == values:
            return held[2]
        joined = replace(
            c,
            metrics={**c.metrics, **{n: f.value for n, f in found.items() if f.value is not None}},
            metric_origins={n: f.origin for n, f in found.items() if f.value is not None and f.origin},
            missing_metrics={n: f.problem or "missing" for n, f in found.items() if f.value is None},
            unreachable_metrics=frozenset(n for n, f in found.items() if f.unreachable),
        )
        self._joined[(run, c.name)] = (c, values, joined)
        return joined
