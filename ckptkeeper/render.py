"""Text and JSON views of plans and outcomes, for people and for scripts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ckptkeeper.engine import Outcome, Policy, Totals
from ckptkeeper.model import Decision, MixedRuns, RunPlan
from ckptkeeper.rules import Best, format_metric, format_rules


def shown(path: str) -> str:
    """A run path for a line of text: control characters (a newline in a directory name could fake a row
    of the table or a log line) are escaped as in Python's repr."""
    return path if path.isprintable() else path.encode("unicode_escape", "backslashreplace").decode("ascii")


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def describe_policy(policy: Policy) -> str:
    parts = [r.describe() for r in policy.rules]
    protected = ["the newest", "incomplete ones"]
    if policy.protections.trainer_best:
        protected.append("the Trainer's best")
    removal = f"archive to {policy.archive_to}" if policy.archive_to else "delete"
    return (
        f"Policy: keep {', '.join(parts)} ({format_rules(policy.rules)}); "
        f"always keep {', '.join(protected)}; {removal} the rest"
    )


def mixed_runs_text(mixed: MixedRuns) -> str:
    """The warning for a run directory that mixes runs (plan and watch say the same)."""
    stale = ", ".join(c.name for c in mixed.stale)
    return (
        f"this directory mixes runs: {mixed.newest_written.name} was written after {mixed.highest_step.name} "
        f"(stale: {stale}); the Trainer resumes from the highest step (get_last_checkpoint), "
        "so move or remove the stale checkpoints"
    )


def metrics_used(policy: Policy) -> list[str]:
    return list(dict.fromkeys(r.metric for r in policy.rules if isinstance(r, Best)))


def _row(d: Decision, metrics: Sequence[str]) -> list[str]:
    c = d.checkpoint
    epoch = "-" if c.epoch is None else f"{c.epoch:.2f}"
    values = [format_metric(c.metrics[m]) if m in c.metrics else "-" for m in metrics]
    return [c.name, str(c.step), epoch, *values, human_bytes(c.size_bytes), str(d.action), shown(", ".join(d.reasons))]


def _table(rows: list[list[str]], right_aligned: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in right_aligned else r[i].ljust(widths[i]) for i in range(len(r))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def plan_text(root: str, policy: Policy, plans: Sequence[RunPlan], warnings: Sequence[str]) -> str:
    metrics = metrics_used(policy)
    lines = [describe_policy(policy), f"Root: {root}"]
    lines += [f"warning: {w}" for w in warnings]
    if not plans:
        lines.append(f"No checkpoint-N directories found below {root} (searched {policy.max_depth} levels deep).")
    for plan in plans:
        count = len(plan.decisions)
        lines.append("")
        lines.append(f"run {shown(plan.run.path)}  ({count} checkpoint{'s' if count != 1 else ''})")
        header = ["CHECKPOINT", "STEP", "EPOCH", *metrics, "SIZE", "DECISION", "REASONS"]
        rows = [header] + [_row(d, metrics) for d in plan.decisions]
        right = {1, 2, *range(3, 4 + len(metrics))}
        lines += _table(rows, right)
        if plan.refusal:
            lines.append(f"  REFUSED: {plan.refusal}")
        if plan.mixed_runs:
            lines.append(f"  warning: {mixed_runs_text(plan.mixed_runs)}")
    lines.append("")
    lines.append(summary_line(plans))
    return "\n".join(lines)


def summary_line(plans: Sequence[RunPlan]) -> str:
    kept = [d for p in plans for d in p.kept]
    removed = [d for p in plans for d in p.removed if not p.refusal]
    total = len(kept) + len(removed)
    runs = len(plans)
    kept_bytes = sum(d.checkpoint.size_bytes for d in kept)
    freed = sum(d.checkpoint.size_bytes for d in removed)
    head = f"Summary: {total} checkpoint{'s' if total != 1 else ''} in {runs} run{'s' if runs != 1 else ''}: "
    refused = sum(1 for p in plans if p.refusal)
    if refused:  # plan and prune refuse as a whole: no run is pruned, not even the ones not refused
        where = f"{refused} run{'s' if refused != 1 else ''}"
        return head + f"refused in {where} (see REFUSED above), so nothing is removed"
    return head + f"keep {len(kept)} ({human_bytes(kept_bytes)}), remove {len(removed)} ({human_bytes(freed)} to free)"


def _finite_or_text(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)  # NaN/Infinity are not valid JSON


def plan_json(root: str, policy: Policy, plans: Sequence[RunPlan], warnings: Sequence[str]) -> dict[str, Any]:
    runs = [
        {
            "run": plan.run.path,
            "refusal": plan.refusal,
            "mixed_runs": None
            if plan.mixed_runs is None
            else {
                "newest_written": plan.mixed_runs.newest_written.name,
                "highest_step": plan.mixed_runs.highest_step.name,
                "stale": [c.name for c in plan.mixed_runs.stale],
            },
            "checkpoints": [
                {
                    "name": d.checkpoint.name,
                    "step": d.checkpoint.step,
                    "epoch": d.checkpoint.epoch,
                    "complete": d.checkpoint.complete,
                    "incomplete_reason": d.checkpoint.incomplete_reason,
                    "metrics": {k: _finite_or_text(v) for k, v in sorted(d.checkpoint.metrics.items())},
                    "size_bytes": d.checkpoint.size_bytes,
                    "decision": str(d.action),
                    "reasons": list(d.reasons),
                }
                for d in plan.decisions
            ],
        }
        for plan in plans
    ]
    kept = [d for p in plans for d in p.kept]
    removed = [d for p in plans for d in p.removed if not p.refusal]
    refused = any(p.refusal for p in plans)  # a refusal anywhere means nothing is removed anywhere
    return {
        "root": root,
        "keep": format_rules(policy.rules),
        "archive_to": str(policy.archive_to) if policy.archive_to else None,
        "warnings": list(warnings),
        "runs": runs,
        "summary": {
            "checkpoints": len(kept) + len(removed),
            "kept": len(kept),
            "removed": 0 if refused else len(removed),
            "refused": refused,
            "bytes_kept": sum(d.checkpoint.size_bytes for d in kept),
            "bytes_to_free": 0 if refused else sum(d.checkpoint.size_bytes for d in removed),
        },
    }


_PAST = {
    "delete": "deleted",
    "archive": "archived",
    "would-delete": "would delete",
    "would-archive": "would archive",
    "vanished": "vanished",
    "skipped": "skipped",
    "stopped": "stopped",
    "error": "FAILED",
}


def location(run: str, checkpoint: str) -> str:
    """`run/checkpoint-N` for lines of text (just the checkpoint in the root's own run)."""
    return checkpoint if run == "." else f"{shown(run)}/{checkpoint}"


def outcome_line(o: Outcome) -> str:
    where = location(o.run, o.checkpoint)
    size = f"  {human_bytes(o.bytes)}" if o.bytes else ""
    detail = f"  ({shown(o.detail)})" if o.detail else ""
    return f"{_PAST[o.action]:<13} {where}{size}{detail}"


def totals_line(totals: Totals, dry_run: bool) -> str:
    if dry_run:
        would = [o for o in totals.outcomes if o.action.startswith("would-")]
        freed = sum(o.bytes for o in would)
        return f"Dry run: would remove {len(would)} checkpoints and free {human_bytes(freed)}; nothing was changed."
    line = f"Done: removed {len(totals.removed)} checkpoints, freed {human_bytes(totals.bytes_freed)}"
    if totals.errors:
        line += f"; {len(totals.errors)} failed (see above)"
    return line + "."
