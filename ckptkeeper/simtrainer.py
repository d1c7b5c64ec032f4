"""A simulated Hugging Face Trainer that writes checkpoints exactly as transformers 5.x does.

Same files and write order as the real Trainer (see the fixtures' README and inotify logs): `mkdir
checkpoint-N`, `config.json`, `model.safetensors` (written to a hidden `.tmpXXXXXX`, then renamed),
`training_args.bin`, `optimizer.pt`, `scheduler.pt`, `rng_state.pth`, and `trainer_state.json` last,
written in place and non-atomically. Metrics are deterministic for a seed. Used by the demo, the tests and
the benchmarks; it trains nothing.

`save_total_limit` rotates as transformers 5.24.0 does (`rotate_checkpoints` below mirrors
`transformers.trainer_utils.rotate_checkpoints(..., use_mtime=True)`, which `Trainer._save_checkpoint` calls
right after writing trainer_state.json): checkpoints are ordered by directory mtime, not by step, unless the
mtimes of all of them span less than 1 s, when it falls back to step order; the newest by that order and the
Trainer's `best_model_checkpoint` are spared. tests/test_simtrainer.py checks it against the real function.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ckptkeeper.integrity import encode_safetensors

Strategy = Literal["steps", "epoch", "no"]


@dataclass(frozen=True)
class SimConfig:
    steps_per_epoch: int = 26
    epochs: int = 3
    save_strategy: Strategy = "steps"
    save_steps: int = 10
    eval_strategy: Strategy = "steps"
    eval_steps: int = 10
    logging_steps: int = 5
    metric_for_best_model: str | None = "eval_loss"  # None: the Trainer tracks no best
    greater_is_better: bool | None = None
    save_total_limit: int | None = None
    save_only_model: bool = False
    shards: int = 1  # >1 writes model-0000i-of-0000n.safetensors and an index
    model_floats: int = 2000  # size of the model tensor
    optimizer_bytes: int = 2048  # size of optimizer.pt (make it large for crash and speed tests)
    nan_eval_steps: frozenset[int] = field(default_factory=frozenset)
    overfit_after: float | None = None  # fraction of training after which eval loss rises again
    eval_sets: tuple[str, ...] = ()  # e.g. ("a", "b"): several eval datasets, keys eval_a_loss, ...
    seed: int = 0

    @property
    def max_steps(self) -> int:
        return self.steps_per_epoch * self.epochs


@dataclass(frozen=True)
class SaveEvent:
    step: int
    path: Path
    on_disk: tuple[str, ...]


class SimulatedTrainer:
    """Writes one run into `output_dir`. `pace` sleeps between optimizer steps; `state_write_pause`
    sleeps halfway through writing trainer_state.json, so a reader can catch it cut short."""

    def __init__(self, output_dir: Path, config: SimConfig = SimConfig()) -> None:
        self.output_dir = output_dir
        self.config = config
        self.rng = random.Random(config.seed)
        self.log_history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.best_step: int | None = None  # the Trainer's state.best_global_step
        self.best_model_checkpoint: str | None = None  # its state.best_model_checkpoint (see save())

    def _epoch(self, step: int) -> float:
        # As the Trainer: completed epochs + the fraction of the current one, so the floats match its own
        # bit for bit (40 steps of 26 -> 1 + 14/26 = 1.5384615384615383, not 40/26) and epoch ends are 1.0, 2.0.
        done, within = divmod(step - 1, self.config.steps_per_epoch)
        return done + (within + 1) / self.config.steps_per_epoch

    def _due(self, strategy: Strategy, every: int, step: int) -> bool:
        """As the Trainer: every `every` steps or at each epoch's end, and always at the last step."""
        if strategy == "no":
            return False
        if step == self.config.max_steps:
            return True
        if strategy == "steps":
            return step % every == 0
        return step % self.config.steps_per_epoch == 0

    def _eval(self, step: int) -> None:
        progress = step / self.config.max_steps
        loss = 0.7 - 0.35 * progress + self.rng.uniform(-0.04, 0.04)
        if self.config.overfit_after is not None and progress > self.config.overfit_after:
            loss += 0.9 * (progress - self.config.overfit_after)  # eval loss turns up: the best is not the last
        accuracy = round(min(1.0, 0.55 + 0.4 * progress + self.rng.uniform(-0.05, 0.05)), 6)
        if step in self.config.nan_eval_steps:
            loss = math.nan
        epoch = self._epoch(step)
        first_set = self.config.eval_sets[0] if self.config.eval_sets else ""
        self._update_best(step, {self._key(first_set, "loss"): loss, self._key(first_set, "accuracy"): accuracy})
        for name in self.config.eval_sets or ("",):
            self.log_history.append(
                {
                    "epoch": epoch,
                    self._key(name, "accuracy"): accuracy,
                    self._key(name, "loss"): loss,
                    self._key(name, "runtime"): 0.015,
                    self._key(name, "samples_per_second"): 4300.0,
                    self._key(name, "steps_per_second"): 270.0,
                    "step": step,
                }
            )

    @staticmethod
    def _key(eval_set: str, metric: str) -> str:
        return f"eval_{eval_set}_{metric}" if eval_set else f"eval_{metric}"

    def _update_best(self, step: int, metrics: dict[str, float]) -> None:
        name = self.config.metric_for_best_model
        if name is None:
            return
        key = name if name.startswith("eval_") else f"eval_{name}"
        value = metrics.get(key)
        if value is None:
            return
        greater = self.config.greater_is_better
        if greater is None:
            greater = not key.endswith("loss")
        if self.best_metric is None:
            # As Trainer._determine_best_metric: the first eval sets the best to -inf/inf, so a run whose evals
            # so far were all NaN writes `"best_metric": Infinity` with `"best_global_step": null`.
            self.best_metric = -math.inf if greater else math.inf
        if value > self.best_metric if greater else value < self.best_metric:  # a NaN is never better
            self.best_metric, self.best_step = value, step

    def _log_train(self, step: int) -> None:
        self.log_history.append(
            {
                "epoch": self._epoch(step),
                "grad_norm": round(self.rng.uniform(0.1, 0.9), 6),
                "learning_rate": 0.01 * (1 - step / self.config.max_steps),
                "loss": round(0.7 - 0.3 * step / self.config.max_steps + self.rng.uniform(-0.05, 0.05), 6),
                "step": step,
            }
        )

    def trainer_state(self, step: int, final: bool) -> dict[str, Any]:
        c = self.config
        return {
            "best_global_step": self.best_step,
            "best_metric": self.best_metric,
            "best_model_checkpoint": self.best_model_checkpoint,
            "epoch": self._epoch(step),
            "eval_steps": c.eval_steps if c.eval_strategy == "steps" else 500,
            "global_step": step,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": list(self.log_history),
            "logging_steps": c.logging_steps,
            "max_steps": c.max_steps,
            "num_input_tokens_seen": 0,
            "num_train_epochs": c.epochs,
            "save_steps": c.save_steps if c.save_strategy == "steps" else 500,
            "stateful_callbacks": {
                "TrainerControl": {
                    "args": {
                        "should_epoch_stop": False,
                        "should_evaluate": False,
                        "should_log": False,
                        "should_save": True,
                        "should_training_stop": final,
                    },
                    "attributes": {},
                }
            },
            "total_flos": 3587291.0 * step,
            "train_batch_size": 8,
            "trial_name": None,
            "trial_params": None,
        }

    def _write_model(self, directory: Path, step: int) -> None:
        c = self.config
        shard_names = (
            ["model.safetensors"]
            if c.shards == 1
            else [f"model-{i:05d}-of-{c.shards:05d}.safetensors" for i in range(1, c.shards + 1)]
        )
        weight_map = {}
        for index, shard in enumerate(shard_names):
            data = self.rng.randbytes(4 * c.model_floats)
            tensors = {
                f"layer{index}.weight": ("float32", [c.model_floats], data),
                f"layer{index}.step": ("int64", [1], step.to_bytes(8, "little")),
            }
            weight_map.update(dict.fromkeys(tensors, shard))
            payload = encode_safetensors(tensors, {"format": "pt"})
            temp = directory / f".tmp{self.rng.randbytes(4).hex()[:6]}"
            temp.write_bytes(payload)
            os.rename(temp, directory / shard)  # the safetensors writer's rename into place
        if c.shards > 1:
            index_doc = {"metadata": {"total_size": 4 * c.model_floats * c.shards}, "weight_map": weight_map}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")

    def save(self, step: int, final: bool, state_write_pause: float = 0.0) -> Path:
        c = self.config
        directory = self.output_dir / f"checkpoint-{step}"
        directory.mkdir()
        (directory / "config.json").write_text(
            json.dumps({"architectures": ["BertForSequenceClassification"], "hidden_size": 16}, indent=2) + "\n"
        )
        self._write_model(directory, step)
        if self.best_step:
            # As Trainer._save_checkpoint: best_model_checkpoint follows best_global_step only when that step's
            # directory exists (an eval between two saves, or a best removed by someone else, leaves it behind).
            best_dir = os.path.join(self.output_dir, f"checkpoint-{self.best_step}")
            if os.path.exists(best_dir):
                self.best_model_checkpoint = best_dir
        (directory / "training_args.bin").write_bytes(self.rng.randbytes(512))
        if not c.save_only_model:
            with open(directory / "optimizer.pt", "wb") as f:
                remaining = c.optimizer_bytes
                while remaining > 0:
                    chunk = min(remaining, 1 << 22)
                    f.write(self.rng.randbytes(chunk))
                    remaining -= chunk
            (directory / "scheduler.pt").write_bytes(self.rng.randbytes(256))
            (directory / "rng_state.pth").write_bytes(self.rng.randbytes(1024))
        text = json.dumps(self.trainer_state(step, final), indent=2, sort_keys=True) + "\n"
        with open(directory / "trainer_state.json", "w") as f:  # in place, not atomic, like the Trainer
            half = len(text) // 2
            f.write(text[:half])
            if state_write_pause > 0:
                f.flush()
                time.sleep(state_write_pause)
            f.write(text[half:])
        self._rotate()
        return directory

    def _rotate(self) -> None:
        """The Trainer's save_total_limit, right after trainer_state.json (Trainer._save_checkpoint)."""
        rotate_checkpoints(self.output_dir, self.config.save_total_limit, self.best_model_checkpoint)

    def _finish(self) -> None:
        """Trainer._finalize_training: with save_total_limit=1, every checkpoint but the best goes at the end
        (the newest too). Like the Trainer, this raises FileNotFoundError if someone removed the best."""
        best = self.best_model_checkpoint
        if self.config.save_total_limit != 1 or best is None:
            return
        for checkpoint in sort_checkpoints(self.output_dir, use_mtime=False, best_model_checkpoint=best):
            if not os.path.samefile(checkpoint, best):
                shutil.rmtree(checkpoint, ignore_errors=True)

    def train(
        self,
        pace: float = 0.0,
        on_save: Callable[[SaveEvent], None] | None = None,
        state_write_pause: float = 0.0,
    ) -> list[int]:
        """Run every step; return the steps that were saved."""
        c = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for step in range(1, c.max_steps + 1):
            if pace > 0:
                time.sleep(pace)
            if step % c.logging_steps == 0:
                self._log_train(step)
            final = step == c.max_steps
            if self._due(c.eval_strategy, c.eval_steps, step):
                self._eval(step)
            if self._due(c.save_strategy, c.save_steps, step):
                path = self.save(step, final, state_write_pause)
                saved.append(step)
                if on_save:
                    on_save(SaveEvent(step, path, tuple(sorted(os.listdir(self.output_dir)))))
        self._finish()
        return saved


# ---- transformers 5.24.0 trainer_utils, line for line (same calls, so the same quirks) ---------------------
# - Candidates are `checkpoint-*` entries for which os.path.isdir holds, symlinks to directories included (rmtree
#   then refuses to delete a link, silently: it still counts as removed). By mtime, every such name takes part
#   (`checkpoint-abc` too); by step, the regex `.*checkpoint-([0-9]+)` is matched from the start of the whole
#   path, so `checkpoint-7.bak` counts as step 7 and `checkpoint-abc` is left out.
# - Equal mtimes fall back to comparing the path strings: `checkpoint-10` sorts before `checkpoint-9`.
# - The newest by that order is spared, not the highest step; so is `best_model_checkpoint`, and when it is set
#   (even to a directory that no longer exists) at least 2 are kept.
# - The mtime span check makes step order what a fast run (every save within 1 s) gets.


def sort_checkpoints(output_dir: Path, use_mtime: bool = False, best_model_checkpoint: str | None = None) -> list[str]:
    """`transformers.trainer_utils.sort_checkpoints`: checkpoint paths, oldest first."""
    found = [str(x) for x in Path(output_dir).glob("checkpoint-*") if os.path.isdir(x)]
    ordering: list[tuple[float, str]] = []
    for path in found:
        if use_mtime:
            ordering.append((os.path.getmtime(path), path))
        else:
            match = re.match(".*checkpoint-([0-9]+)", path)
            if match is not None:
                ordering.append((int(match.group(1)), path))
    ordering.sort()
    # "mtime may not be reliable on this filesystem, falling back to numerical ordering"
    if use_mtime and len(ordering) > 1 and ordering[-1][0] - ordering[0][0] < 1.0:
        return sort_checkpoints(output_dir, use_mtime=False, best_model_checkpoint=best_model_checkpoint)
    paths = [path for _, path in ordering]
    if best_model_checkpoint is not None:
        best = str(Path(best_model_checkpoint))
        if best in paths and paths[-1] != best:
            newest = paths[-1]
            paths = [p for p in paths if p not in {best, newest}] + [best, newest]
    return paths


def rotate_checkpoints(output_dir: Path, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """`transformers.trainer_utils.rotate_checkpoints(..., use_mtime=True)`, as Trainer._save_checkpoint calls it."""
    if save_total_limit is None or save_total_limit <= 0:
        return
    checkpoints = sort_checkpoints(output_dir, use_mtime=True)
    if len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    keep = max(save_total_limit, len(protected))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= keep:
            break
        if checkpoint not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1


def simulate_run(output_dir: Path, config: SimConfig = SimConfig(), pace: float = 0.0) -> list[int]:
    return SimulatedTrainer(output_dir, config).train(pace)
