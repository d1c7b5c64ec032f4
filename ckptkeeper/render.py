"""Text and JSON views of plans and outcomes, for people and for scripts. The only module that words a
`Reason` or an `Outcome`; it reads the pipeline's values and never acts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptkeeper.colour import PLAIN, Palette
from ckptkeeper.model import (
    Action,
    Checkpoint,
    Decision,
    MixedRuns,
    Outcome,
    OutcomeKind,
    Overdue,
    Reason,
    ReasonKind,
    RunPlan,
    Stale,
    root_name,
)
from ckptkeeper.policy import Policy, RootPlan
from ckptkeeper.pressure import NO_FIGURES, DiskPressure, figures_text
from ckptkeeper.rules import format_metric, format_rules
from ckptkeeper.units import count, human_bytes, human_duration

if TYPE_CHECKING:
    from ckptkeeper.engine import Leftovers, PassResult
    from ckptkeeper.metric_specs import MetricSpec


def shown(path: str) -> str:
    """A run path for a line of text: control characters (a newline in a directory name could fake a row
    of the table or a log line) are escaped as in Python's repr."""
    return path if path.isprintable() else path.encode("unicode_escape", "backslashreplace").decode("ascii")


def _held(r: Reason) -> str:
    where = f"run {r.detail!r}" if r.of == 1 else f"{r.of} runs"
    return f"held: retention is refused in {where}"


def _left(r: Reason) -> str:
    return "" if r.left is None else f" ({human_duration(r.left)} left)"


def _pinned(r: Reason) -> str:
    note = "" if r.detail is None else f" {json.dumps(r.detail, ensure_ascii=False)}"
    return f"protected: pinned{note}{_left(r)}"


# How each kind of reason reads. A new rule or protection adds its kind here.
REASON_TEXT: dict[ReasonKind, Callable[[Reason], str]] = {
    ReasonKind.LAST: lambda r: f"last {r.rank}/{r.of}",
    ReasonKind.BEST: lambda r: f"best {r.metric}={format_metric(r.value or 0.0)} ({r.rank}/{r.of})",
    ReasonKind.EPOCH: lambda r: f"epoch {r.detail}",
    ReasonKind.EVERY: lambda r: f"every {r.detail}",
    ReasonKind.NEWEST: lambda r: "protected: newest",
    ReasonKind.NEWEST_WRITTEN: lambda r: "protected: newest written",
    ReasonKind.NEWEST_WRITTEN_SKEWED: lambda r: "protected: newest written (clock skew)",
    ReasonKind.TRAINER_BEST: lambda r: "protected: trainer best",
    ReasonKind.INCOMPLETE: lambda r: f"incomplete: {r.detail}",
    ReasonKind.REFUSED: lambda r: "refused: nothing is removed in this run",
    ReasonKind.HELD: _held,
    ReasonKind.NO_RULE_KEEPS: lambda r: "no rule keeps it",
    ReasonKind.WEIGHTS_INSIDE: lambda r: "kept whole: its weights exist only inside the resume state",
    ReasonKind.STAYS_WEIGHTS_ONLY: lambda r: "weights only, cannot be made whole again",
    ReasonKind.PRESSURE: lambda r: f"disk pressure: {r.detail}",
    ReasonKind.PINNED: _pinned,
    ReasonKind.AWAITING: lambda r: f"awaiting {r.metric}{_left(r)}",
}


def reason_text(reason: Reason) -> str:
    text = REASON_TEXT[reason.kind](reason)
    text = f"{text} (weights only)" if reason.weights_only else text
    return f"was {text}" if reason.released else text


def decision_text(d: Decision) -> str:
    """The DECISION column: `keep`, `keep (weights only)`, `delete`, `archive`."""
    return "keep (weights only)" if d.action is Action.WEIGHTS_ONLY else str(d.action)


def reason_texts(reasons: Sequence[Reason]) -> list[str]:
    return [reason_text(r) for r in reasons]


def reasons_text(reasons: Sequence[Reason]) -> str:
    """The reasons on one line of text (the plan's REASONS column, the watch log)."""
    return shown(", ".join(reason_texts(reasons)))


def journal_reasons(reasons: Sequence[Reason]) -> str:
    """The reasons as the journal's `why` says them."""
    return "; ".join(reason_texts(reasons))


def reason_json(reason: Reason) -> dict[str, Any]:
    """A reason for scripts (README, "plan --json"): its kind, the rule as written (or the protection), the
    checkpoint's rank among what that rule keeps, whether disk pressure released it, and the text a person reads."""
    return {
        "kind": str(reason.kind),
        "rule": reason.rule,
        "rank": reason.rank,
        "released": reason.released,
        "until": reason.until,
        "text": reason_text(reason),
    }


def describe_policy(policy: Policy, archive_to: Path | str | None = None) -> str:
    parts = [r.describe() for r in policy.rules]
    whole = f"keep {', '.join(parts)} ({format_rules(policy.rules)}); " if parts else ""
    weights = ", ".join(r.describe() for r in policy.weight_rules)
    if weights:
        whole += f"keep the weights only of {weights} ({format_rules(policy.weight_rules)}); "
    protected = [said for p in policy.protections.members if (said := p.describe())]
    removal = f"archive to {archive_to}" if archive_to else "delete"
    return f"Policy: {whole}always keep {', '.join(protected)}; {removal} the rest{_pressure_policy(policy)}"


def _pressure_policy(policy: Policy) -> str:
    p = policy.pressure
    if p is None:
        return ""
    floor = f"keep {p.floor.text} free on each filesystem, plus the next save of each run still training"
    if not p.releases:
        return f"; {floor} (disk pressure is reported, nothing more is removed for it)"
    return f"; {floor}: under disk pressure keep only {format_rules(p.rules)} and the protected"


def pressure_line(p: DiskPressure) -> str:
    """One filesystem's verdict, as plan, prune and the watch log say it."""
    if p.deferred == NO_FIGURES:
        return f"disk {shown(p.disk.where)}: {NO_FIGURES}"
    head = f"disk {shown(p.disk.where)}: {figures_text(p)}"
    if not p.under:
        return f"{head}: no pressure"
    head += ": UNDER PRESSURE"
    if not p.acts:
        return f"{head} (reported only: --keep-under-pressure releases checkpoints)"
    if p.deferred:
        return f"{head}; nothing released: {p.deferred}"
    n = count(len(p.released), "checkpoint")
    if p.met:
        return f"{head}; releasing {n} frees {human_bytes(p.released_bytes)}"
    blocked = (
        f"; {count(p.archive_blocked, 'more checkpoint')} could be released, but --archive-to is on this same "
        "filesystem, where archiving frees nothing"
        if p.archive_blocked
        else ""
    )
    if p.room_blocked:
        blocked += (
            f"; {count(p.room_blocked, 'more checkpoint')} could be released, but archiving it would take the "
            "archive's filesystem, where runs save too, below its own floor"
        )
    return (
        f"{head}; CANNOT MEET THE FLOOR: releasing all the pressure rules allow ({n}) frees "
        f"{human_bytes(p.released_bytes)}, still {human_bytes(p.shortfall)} short{blocked}; protected checkpoints "
        "are never removed"
    )


def weights_only_resume_text(c: Checkpoint) -> str:
    """The warning for a run whose resume point is weights-only (plan, prune and watch say the same)."""
    return (
        f"{c.name}, where a resume of this run starts, is weights only: the Trainer would resume from it with a "
        "fresh optimizer and say nothing; resume from a whole checkpoint, or start the run anew"
    )


def run_warnings(plan: RunPlan) -> list[str]:
    """The warnings of one run, each a line of text."""
    found = [mixed_runs_text(plan.mixed_runs)] if plan.mixed_runs else []
    found += [weights_only_resume_text(plan.weights_only_resume)] if plan.weights_only_resume else []
    return found + [stale_text(s) for s in plan.stale] + overdue_lines(plan.overdue)


def overdue_lines(overdue: Sequence[Overdue]) -> list[str]:
    """`acc_norm never arrived within 6h for checkpoint-40, checkpoint-80: judged without it`, one per metric."""
    by_metric: dict[tuple[str, float], list[str]] = {}
    for o in overdue:
        by_metric.setdefault((o.metric, o.timeout), []).append(o.checkpoint.name)
    return [
        f"{shown(metric)} never arrived within {human_duration(timeout)} for {', '.join(names)}: judged without it"
        for (metric, timeout), names in by_metric.items()
    ]


def stale_text(s: Stale) -> str:
    """The warning for an incomplete checkpoint unchanged for longer than --stale-after (plan, prune, watch)."""
    c = s.checkpoint
    head = (
        f"{c.name} is incomplete ({shown(c.incomplete_reason or 'unknown')}) and unchanged for "
        f"{human_duration(s.unchanged_for)}: left by a crash?"
    )
    if s.resume_point:
        head += " A resume starts from the highest step, complete or not (get_last_checkpoint), and would fail here;"
    tail = "move it aside or remove it yourself (ckptkeeper never removes an incomplete checkpoint)"
    return f"{head} {tail if s.resume_point else tail[0].upper() + tail[1:]}"


def stale_json(s: Stale) -> dict[str, Any]:
    c = s.checkpoint
    return {
        "name": c.name,
        "step": c.step,
        "incomplete_reason": c.incomplete_reason,
        "unchanged_seconds": round(s.unchanged_for, 3),
        "resume_point": s.resume_point,
        "text": stale_text(s),
    }


def mixed_runs_text(mixed: MixedRuns) -> str:
    """The warning for a run directory that mixes runs (plan and watch say the same)."""
    stale = ", ".join(c.name for c in mixed.stale)
    return (
        f"this directory mixes runs: {mixed.newest_written.name} was written after {mixed.highest_step.name} "
        f"(stale: {stale}); the Trainer resumes from the highest step (get_last_checkpoint), "
        "so move or remove the stale checkpoints"
    )


def _row(d: Decision, metrics: Sequence[str]) -> list[str]:
    c = d.checkpoint
    epoch = "-" if c.epoch is None else f"{c.epoch:.2f}"
    values = [format_metric(c.metrics[m]) if m in c.metrics else "-" for m in metrics]
    return [c.name, str(c.step), epoch, *values, human_bytes(c.size_bytes), decision_text(d), reasons_text(d.reasons)]


def _table(
    rows: list[list[str]], right_aligned: set[int], roles: dict[tuple[int, int], str], palette: Palette
) -> list[str]:
    """Aligned columns; the cells in `roles` ((row, column) -> role) painted after padding."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for y, r in enumerate(rows):
        cells = [r[i].rjust(widths[i]) if i in right_aligned else r[i].ljust(widths[i]) for i in range(len(r))]
        cells = [palette.paint(cell, roles[y, x]) if (y, x) in roles else cell for x, cell in enumerate(cells)]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def no_runs_text(root: str, max_depth: int) -> str:
    return f"No checkpoint-N directories found below {root} (searched {max_depth} levels deep)."


def plan_text(
    root: str,
    policy: Policy,
    plan: RootPlan,
    warnings: Sequence[str],
    archive_to: Path | str | None = None,
    max_depth: int = 4,
    palette: Palette = PLAIN,
    sources: Sequence[MetricSpec] = (),
) -> str:
    metrics = policy.metrics()
    plans = plan.runs
    lines = [describe_policy(policy, archive_to), *metric_source_lines(sources), f"Root: {root}"]
    lines += [f"warning: {shown(w)}" for w in warnings]
    if not plans:
        lines.append(no_runs_text(root, max_depth))
    for run_plan in plans:
        lines += _run_lines(run_plan, metrics, palette)
    if plan.pressure:
        lines += ["", *(pressure_line(p) for p in plan.pressure)]
    lines.append("")
    lines.append(summary_line(plans))
    return "\n".join(lines)


def _run_lines(plan: RunPlan, metrics: Sequence[str], palette: Palette) -> list[str]:
    lines = ["", f"run {shown(plan.run.label)}  ({count(len(plan.decisions), 'checkpoint')})"]
    header = ["CHECKPOINT", "STEP", "EPOCH", *metrics, "SIZE", "DECISION", "REASONS"]
    rows = [header] + [_row(d, metrics) for d in plan.decisions]
    column = len(header) - 2
    roles = {(y, column): str(d.action) for y, d in enumerate(plan.decisions, start=1)}
    lines += _table(rows, {1, 2, *range(3, 4 + len(metrics))}, roles, palette)
    if plan.refusal:
        lines.append(f"  REFUSED: {shown(plan.refusal)}")
    lines += [f"  {line}" for line in missing_metric_lines(plan)]
    lines += [f"  warning: {w}" for w in run_warnings(plan)]
    return lines


def metric_source_lines(sources: Sequence[MetricSpec]) -> list[str]:
    """`Metric hellaswag: lm-eval:/data/evals#/results/hellaswag/acc_norm,none`, one per `--metric`."""
    return [f"Metric {spec.name}: {shown(spec.source)}" for spec in sources]


def missing_metric_lines(plan: RunPlan) -> list[str]:
    """Why complete checkpoints lack a named metric, one line per metric and reason (`acc: not evaluated yet
    (no results in /data/evals): checkpoint-40, checkpoint-80`)."""
    lacking: dict[tuple[str, str], list[str]] = {}
    for d in plan.decisions:
        c = d.checkpoint
        if c.complete:
            for name, why in sorted(c.missing_metrics.items()):
                lacking.setdefault((name, why), []).append(c.name)
    return [f"{name} missing: {shown(why)}: {', '.join(names)}" for (name, why), names in lacking.items()]


def summary_line(plans: Sequence[RunPlan]) -> str:
    kept = [d for p in plans for d in p.kept]
    removed = [d for p in plans for d in p.removed]
    total = len(kept) + len(removed)
    runs = len(plans)
    kept_bytes = sum(d.checkpoint.size_bytes for d in kept)
    freed = sum(d.checkpoint.size_bytes for d in removed)
    head = f"Summary: {count(total, 'checkpoint')} in {count(runs, 'run')}: "
    refused = sum(1 for p in plans if p.refusal)
    if refused:  # plan and prune refuse as a whole: no run is pruned, not even the ones not refused
        where = count(refused, "run")
        return head + f"refused in {where} (see REFUSED above), so nothing is removed"
    slims = [d for p in plans for d in p.decisions if d.slims]
    line = f"keep {len(kept)} ({human_bytes(kept_bytes)}), remove {len(removed)} ({human_bytes(freed)} to free)"
    if slims:
        slim_bytes = sum(d.checkpoint.resume_bytes for d in slims)
        verb = "becomes" if len(slims) == 1 else "become"
        line += f"; {len(slims)} of those kept {verb} weights only ({human_bytes(slim_bytes)} more to free)"
    return head + line


def _finite_or_text(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # NaN/Infinity are not valid JSON


def plan_json(
    root: str,
    policy: Policy,
    plan: RootPlan,
    warnings: Sequence[str],
    archive_to: Path | str | None = None,
    sources: Sequence[MetricSpec] = (),
) -> dict[str, Any]:
    plans = plan.runs
    runs = [
        {
            "run": plan.run.path,
            "refusal": plan.refusal,
            "stale_incomplete": [stale_json(s) for s in plan.stale],
            "mixed_runs": None
            if plan.mixed_runs is None
            else {
                "newest_written": plan.mixed_runs.newest_written.name,
                "highest_step": plan.mixed_runs.highest_step.name,
                "stale": [c.name for c in plan.mixed_runs.stale],
            },
            "checkpoints": [decision_json(d) for d in plan.decisions],
        }
        for plan in plans
    ]
    return {
        "root": root,
        "keep": format_rules(policy.rules),
        "keep_weights": format_rules(policy.weight_rules),
        "archive_to": str(archive_to) if archive_to else None,
        "min_free": policy.pressure.floor.text if policy.pressure else None,
        "keep_under_pressure": format_rules(policy.pressure.rules) if policy.pressure else "",
        "metrics_defined": {spec.name: spec.source for spec in sources},
        "await": [a.format() for a in policy.protections.awaits],
        "warnings": [*warnings, *_resume_warnings(plan)],
        "runs": runs,
        "disk_pressure": [pressure_json(p) for p in plan.pressure],
        "summary": _summary_json(plan),
    }


def decision_json(d: Decision) -> dict[str, Any]:
    """One checkpoint of a plan for scripts: what was seen of it, and the decision with its reasons."""
    c = d.checkpoint
    return {
        "name": c.name,
        "step": c.step,
        "epoch": c.epoch,
        "complete": c.complete,
        "incomplete_reason": c.incomplete_reason,
        "metrics": {k: _finite_or_text(v) for k, v in sorted(c.metrics.items())},
        "metric_sources": dict(sorted(c.metric_origins.items())),
        "missing_metrics": dict(sorted(c.missing_metrics.items())),
        "size_bytes": c.size_bytes,
        "decision": str(d.action),
        "reasons": [reason_json(r) for r in d.reasons],
    }


def release_lines(plan: RootPlan) -> list[str]:
    """`released exp1/checkpoint-20 (delete): disk pressure: ..., was epoch 1`, one per release."""
    released = {(r.run, r.checkpoint) for p in plan.pressure for r in p.released}
    return [
        f"released {shown(run_plan.run.label)}/{d.checkpoint.name} ({d.action}): {reasons_text(d.reasons)}"
        for run_plan in plan.runs
        for d in run_plan.decisions
        if (run_plan.run.path, d.checkpoint.name) in released
    ]


def pressure_json(p: DiskPressure) -> dict[str, Any]:
    """One filesystem's verdict for scripts: the figures, what is released, and whether the floor is met."""
    return {
        "filesystem": p.disk.where,
        "device": p.disk.device,
        "free_bytes": p.disk.free,
        "size_bytes": p.disk.total,
        "planned_free_bytes": p.planned,
        "incoming_archive_bytes": p.incoming,
        "unseen_free_bytes": p.unseen,
        "floor_bytes": p.floor,
        "next_save_bytes": p.next_save,
        "training_runs": list(p.training),
        "under_pressure": p.under,
        "released": [
            {"run": r.run, "checkpoint": r.checkpoint, "action": str(r.action), "frees_bytes": r.frees}
            for r in p.released
        ],
        "released_bytes": p.released_bytes,
        "archive_blocked": p.archive_blocked,
        "archive_room_blocked": p.room_blocked,
        "floor_met": p.met,
        "shortfall_bytes": p.shortfall,
        "deferred": p.deferred,
        "text": pressure_line(p),
    }


def _resume_warnings(plan: RootPlan) -> list[str]:
    """Runs whose resume point is weights-only: a warning for scripts too (the mixed-runs one has its own key)."""
    resume = [
        f"run {p.run.label}: {weights_only_resume_text(p.weights_only_resume)}"
        for p in plan.runs
        if p.weights_only_resume is not None
    ]
    return resume + [f"run {p.run.label}: {stale_text(s)}" for p in plan.runs for s in p.stale]


def _summary_json(plan: RootPlan) -> dict[str, Any]:
    kept = [d for p in plan.runs for d in p.kept]
    removed = [d for p in plan.runs for d in p.removed]
    slims = [d for p in plan.runs for d in p.decisions if d.slims]
    return {
        "checkpoints": len(kept) + len(removed),
        "kept": len(kept),
        "weights_only": sum(1 for d in kept if d.action is Action.WEIGHTS_ONLY),
        "removed": len(removed),
        "refused": bool(plan.refused_runs),  # a refusal anywhere means nothing is removed anywhere
        "bytes_kept": sum(d.checkpoint.size_bytes for d in kept) - sum(d.checkpoint.resume_bytes for d in slims),
        "bytes_to_free": sum(d.checkpoint.size_bytes for d in removed) + sum(d.checkpoint.resume_bytes for d in slims),
    }


_PAST = {
    OutcomeKind.DELETED: "deleted",
    OutcomeKind.ARCHIVED: "archived",
    OutcomeKind.WOULD_DELETE: "would delete",
    OutcomeKind.WOULD_ARCHIVE: "would archive",
    OutcomeKind.SLIMMED: "weights only",
    OutcomeKind.WOULD_SLIM: "would slim",
    OutcomeKind.VANISHED: "vanished",
    OutcomeKind.SKIPPED: "skipped",
    OutcomeKind.STOPPED: "stopped",
    OutcomeKind.ERROR: "FAILED",
}
DRY_RUN = (OutcomeKind.WOULD_DELETE, OutcomeKind.WOULD_ARCHIVE, OutcomeKind.WOULD_SLIM)


def past(kind: OutcomeKind) -> str:
    return _PAST[kind]


def run_name(run: str, root: str) -> str:
    """A run for lines of text: its path below the root; the root's own run (".") by `root`, its name."""
    return shown(root if run == "." else run)


def location(run: str, checkpoint: str, root: str) -> str:
    """`run/checkpoint-N` for lines of text (`root` names the root's own run, as `run_name`)."""
    return f"{run_name(run, root)}/{checkpoint}"


_ROLE = {
    OutcomeKind.DELETED: "delete",
    OutcomeKind.WOULD_DELETE: "delete",
    OutcomeKind.ARCHIVED: "archive",
    OutcomeKind.WOULD_ARCHIVE: "archive",
    OutcomeKind.SLIMMED: "weights-only",
    OutcomeKind.WOULD_SLIM: "weights-only",
    OutcomeKind.SKIPPED: "warning",
    OutcomeKind.STOPPED: "warning",
    OutcomeKind.ERROR: "error",
}


def outcome_role(kind: OutcomeKind) -> str:
    """The colour role of an outcome (`colour.Palette`)."""
    return _ROLE.get(kind, "")


def outcome_line(o: Outcome, root: str, palette: Palette = PLAIN) -> str:
    """`deleted       exp1/checkpoint-10  405.5 kB  no rule keeps it`: what happened, and why the plan said so."""
    where = location(o.run, o.checkpoint, root)
    size = f"  {human_bytes(o.bytes)}" if o.bytes else ""
    why = f"  {reasons_text(o.reasons)}" if o.reasons and (o.action.frees or o.action in DRY_RUN) else ""
    detail = f"  ({shown(o.detail)})" if o.detail else ""
    return f"{palette.paint(f'{_PAST[o.action]:<13}', outcome_role(o.action))} {where}{size}{why}{detail}"


SAME_FILESYSTEM = "to the archive on the same filesystem, which frees no space"


def totals_line(outcomes: Sequence[Outcome], dry_run: bool, archive_moves: bool = False) -> str:
    """The last line of prune. `archive_moves`: --archive-to is on the root's filesystem (a dry run cannot
    see how each archive would go; a real one knows from each outcome)."""
    if dry_run:
        return _would_line(outcomes, archive_moves)
    done = [o for o in outcomes if o.action.frees]
    slims = [o for o in done if o.action is OutcomeKind.SLIMMED]
    moved = [o for o in done if o.moved]
    errors = [o for o in outcomes if o.action is OutcomeKind.ERROR]
    freed = sum(o.bytes for o in done if not o.moved)
    line = f"Done: removed {count(len(done) - len(slims), 'checkpoint')}"
    line += f", made {len(slims)} weights only" if slims else ""
    line += f", freed {human_bytes(freed)}" if freed or not moved else ""
    if moved:
        line += f"; moved {_moved_text(moved)}"
    if errors:
        line += f"; {len(errors)} failed (see above)"
    return line + "."


def _moved_text(moved: Sequence[Outcome]) -> str:
    return f"{count(len(moved), 'checkpoint')} ({human_bytes(sum(o.bytes for o in moved))}) {SAME_FILESYSTEM}"


def _would_line(outcomes: Sequence[Outcome], archive_moves: bool) -> str:
    would = [o for o in outcomes if o.action in DRY_RUN]
    slims = [o for o in would if o.action is OutcomeKind.WOULD_SLIM]
    moving = [o for o in would if archive_moves and o.action is OutcomeKind.WOULD_ARCHIVE]
    freed = sum(o.bytes for o in would) - sum(o.bytes for o in moving)
    line = f"Dry run: would remove {count(len(would) - len(slims), 'checkpoint')}"
    line += f", make {len(slims)} weights only" if slims else ""
    line += f" and free {human_bytes(freed)}" if freed or not moving else ""
    if moving:
        line += f"; would move {_moved_text(moving)}"
    return line + "; nothing was changed."


def outcome_json(o: Outcome) -> dict[str, Any]:
    """One action of `prune --json`: `action` is the journal's word (`delete`, `archive`, `slim`, `would-delete`,
    `vanished`, `skipped`, `stopped`, `error`)."""
    return {
        "run": o.run,
        "checkpoint": o.checkpoint,
        "step": o.step,
        "action": str(o.action),
        "bytes": o.bytes,
        "bytes_freed": o.bytes if o.action.frees and not o.moved else 0,  # a dry run frees none
        "detail": o.detail or None,
        "reasons": [reason_json(r) for r in o.reasons],
    }


def prune_json(
    root: str, policy: Policy, result: PassResult, dry_run: bool, archive_to: Path | str | None = None
) -> dict[str, Any]:
    """What `prune --json` prints once the pass is over (or refused)."""
    outcomes = result.outcomes
    done = [o for o in outcomes if o.action.frees]
    kept = sum(len(p.kept) for p in result.plan.runs)
    return {
        "root": root,
        "dry_run": dry_run,
        "keep": format_rules(policy.rules),
        "keep_weights": format_rules(policy.weight_rules),
        "archive_to": str(archive_to) if archive_to else None,
        "refused": [{"run": p.run.path, "refusal": p.refusal} for p in result.plan.refusals],
        "leftovers": {"finished": list(result.leftovers.finished), "stuck": list(result.leftovers.stuck)},
        "warnings": [*result.warnings, *(f"run {p.run.label}: {w}" for p in result.plan.runs for w in run_warnings(p))],
        "disk_pressure": [pressure_json(p) for p in result.plan.pressure],
        "actions": [outcome_json(o) for o in outcomes],
        "summary": {
            "removed": sum(o.action.removed for o in outcomes),
            "deleted": sum(o.action is OutcomeKind.DELETED for o in outcomes),
            "archived": sum(o.action is OutcomeKind.ARCHIVED for o in outcomes),
            "made_weights_only": sum(o.action is OutcomeKind.SLIMMED for o in outcomes),
            "would_remove": sum(o.action in (OutcomeKind.WOULD_DELETE, OutcomeKind.WOULD_ARCHIVE) for o in outcomes),
            "would_make_weights_only": sum(o.action is OutcomeKind.WOULD_SLIM for o in outcomes),
            "failed": sum(o.action is OutcomeKind.ERROR for o in outcomes),
            "not_done": sum(o.action in (OutcomeKind.SKIPPED, OutcomeKind.STOPPED) for o in outcomes),
            "bytes_freed": sum(o.bytes for o in done if not o.moved),
            "bytes_moved": sum(o.bytes for o in done if o.moved),
            "kept": kept,
        },
    }


class QuietPruneReport:
    """Says nothing as the pass goes (`prune --json` prints it all at the end)."""

    def leftovers(self, leftovers: Leftovers) -> None:
        pass

    def planned(self, plan: RootPlan, warnings: Sequence[str]) -> None:
        pass

    def outcome(self, outcome: Outcome) -> None:
        pass


def refusal_text(plan: RootPlan, nothing: str) -> str:
    """The error of a refused plan or prune, each refused run on its own line; `nothing` says what did not
    happen ("nothing would be removed")."""
    refused = plan.refusals
    if not refused:  # refused only elsewhere (known to the watch daemon): no reason here to show
        return f"refused in {', '.join(repr(r) for r in plan.refused_runs)}; {nothing}"
    if len(refused) == 1:
        return f"refused in run {refused[0].run.label!r}; {nothing}: {shown(refused[0].refusal or '')}"
    lines = [f"refused in {len(refused)} runs; {nothing}:"]
    return "\n".join(lines + [f"  {shown(p.run.label)}: {shown(p.refusal or '')}" for p in refused])


class TextPruneReport:
    """What `prune` prints as it goes (engine.PruneReport): the policy first, then leftovers finished,
    warnings, one line per removal, and the totals."""

    def __init__(
        self,
        echo: Callable[[str, bool], None],
        policy: Policy,
        root: Path,
        archive_to: Path | str | None,
        palette: Palette = PLAIN,
    ) -> None:
        self.echo = echo
        echo(describe_policy(policy, archive_to), False)
        echo(f"Root: {root}", False)
        self.root = root
        self.name = root_name(root)
        self.palette = palette

    def leftovers(self, leftovers: Leftovers) -> None:
        for name in leftovers.finished:
            self.echo(f"finished removing {name}, left in the trash by an interrupted run", False)
        for problem in leftovers.stuck:
            self.echo(f"warning: could not finish removing {problem}; it stays in the trash", True)

    def planned(self, plan: RootPlan, warnings: Sequence[str]) -> None:
        for verdict in plan.pressure:
            self.echo(pressure_line(verdict), not verdict.met)  # a warning, unless releases meet the floor
        for line in release_lines(plan):
            self.echo(line, False)
        for warning in warnings:
            self.echo(f"warning: {shown(warning)}", True)
        for run_plan in plan.runs:
            for warning in run_warnings(run_plan):
                self.echo(f"warning: run {shown(run_plan.run.label)}: {warning}", True)

    def outcome(self, outcome: Outcome) -> None:
        self.echo(outcome_line(outcome, self.name, self.palette), False)

    def finished(self, result: PassResult, dry_run: bool, max_depth: int, archive_moves: bool = False) -> None:
        """The last lines, when nothing was refused."""
        if not result.plan.runs:
            self.echo(no_runs_text(str(self.root), max_depth), False)
        kept = sum(len(p.kept) for p in result.plan.runs)
        self.echo(totals_line(result.outcomes, dry_run, archive_moves) + f" Kept {kept}.", False)
