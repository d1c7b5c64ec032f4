"""What the watch daemon says about evaluation jobs' results (`--metric`, `--await`), each thing once: an awaited
evaluation that never arrived, and a results file that could not be tied to a checkpoint. Owned by the daemon's
main loop (through its `DecisionLog`); words only, nothing here acts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ckptkeeper.logs import event
from ckptkeeper.model import RunPlan
from ckptkeeper.render import shown
from ckptkeeper.units import human_duration

log = logging.getLogger("ckptkeeper")


class EvaluationLog:
    def __init__(self, where: Callable[[str, str], str]) -> None:
        self.where = where  # how a checkpoint of a run is named in the log
        self.overdue_said: set[tuple[str, str, str]] = set()  # (run, checkpoint, metric) whose evaluation never came
        self.warnings_said: set[str] = set()  # results files that could not be tied to a checkpoint

    def overdue(self, plan: RunPlan) -> None:
        """Each awaited evaluation that never arrived, once (the checkpoint is judged without it from now on)."""
        for o in plan.overdue:
            key = (plan.run.path, o.checkpoint.name, o.metric)
            if key in self.overdue_said:
                continue
            self.overdue_said.add(key)
            fields = event("overdue", plan.run.path, o.checkpoint.name, o.checkpoint.step)
            log.warning(
                "%s: its evaluation never arrived: no %s within %s; judged without it",
                self.where(plan.run.path, o.checkpoint.name),
                shown(o.metric),
                human_duration(o.timeout),
                extra=fields,
            )

    def warnings(self, texts: Sequence[str]) -> None:
        """What a metric source could not tie to a checkpoint, each once."""
        for text in texts:
            if text not in self.warnings_said:
                self.warnings_said.add(text)
                log.warning("%s", shown(text))
