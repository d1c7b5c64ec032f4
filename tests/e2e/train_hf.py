"""A small, real Hugging Face Trainer run for the end-to-end test (CPU only, fully offline).

    python tests/e2e/train_hf.py OUTPUT_DIR --summary SUMMARY.json [--epochs 3] [--save-steps 10]
        [--step-sleep 0.05] [--step-sleep-max 0.3] [--max-steps 40] [--save-total-limit 3]
        [--learning-rate 0.01] [--train-noise 0.1] [--seed 42]

A tiny BertForSequenceClassification is built from a config (nothing is downloaded) and trained on
synthetic token ids with `load_best_model_at_end=True` (best by eval_loss), evaluating and saving every
`--save-steps` steps (26 optimizer steps per epoch, so most saves fall inside an epoch). The labels follow a
simple rule (token 7 present; 10% of the train labels flipped). With the defaults the constant, fairly high
learning rate makes eval_loss fall to its best mid-run (step 40 of 78 on the reference machine) and then
wander above it, so the Trainer's best checkpoint is neither one of the newest nor the last of its epoch:
only the `best` rule and the trainer-best protection keep it until `load_best_model_at_end` loads it.

`--save-total-limit N` turns on the Trainer's own rotation (off by default), `--max-steps` ends training
early, and with `--step-sleep-max` each step sleeps a random time between `--step-sleep` and it, drawn from
its own seeded RNG (the training is unchanged): that sweeps the moment of each save, and of the Trainer's
rotation right after it, across whatever runs beside it.

SUMMARY.json is written whether training succeeds or not. It holds:
- `ok`, `error` (exception type and message, with the traceback) and the versions used;
- `log_history`, `global_step`, `best_global_step`, `best_model_checkpoint`, `best_metric`;
- `saves`: one record per `on_save`, taken right after the Trainer finished writing the checkpoint: its
  step and epoch, the Trainer's best at that moment, the checkpoints then on disk, and every file of the
  new checkpoint with its size and mtime (nanoseconds), plus the directory's own mtime;
- `load_best`: whether the Trainer's end-of-training load of the best model ran, whether the best
  checkpoint existed when it did, any "Could not locate the best model" warning, and whether the final
  model weights equal the best checkpoint's `model.safetensors` (the proof that the best was loaded);
- `best_model_loaded`: the verdict of all of that;
- `final_listing`: what the output directory held when the script finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# Offline, quiet and hermetic before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import transformers
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
SEQ_LEN = 16
VOCAB = 100
N_TRAIN = 203  # batch 8 -> 26 optimizer steps per epoch, so most saves fall inside an epoch
N_EVAL = 64
NOT_FOUND_WARNING = "Could not locate the best model"


class SyntheticRows(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Random token ids; label = 1 iff token 7 occurs, flipped with probability `noise`."""

    def __init__(self, n: int, seed: int, noise: float) -> None:
        g = np.random.default_rng(seed)
        self.rows: list[dict[str, torch.Tensor]] = []
        for _ in range(n):
            ids = g.integers(8, VOCAB, size=SEQ_LEN)
            if g.random() < 0.5:
                ids[g.integers(1, SEQ_LEN)] = 7
            ids[0] = 2  # a stand-in for [CLS]
            label = int((ids == 7).any())
            if g.random() < noise:
                label = 1 - label
            self.rows.append(
                {
                    "input_ids": torch.tensor(ids, dtype=torch.long),
                    "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
                    "labels": torch.tensor(label, dtype=torch.long),
                }
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def checkpoint_names(run_dir: Path) -> list[str]:
    found = [(int(m.group(1)), e) for e in os.listdir(run_dir) if (m := CHECKPOINT_NAME.fullmatch(e))]
    return [name for _, name in sorted(found)]


def file_listing(checkpoint: Path) -> dict[str, list[int]]:
    """Every file below `checkpoint` -> [size, mtime_ns] (symlinks are not followed)."""
    listing: dict[str, list[int]] = {}
    for dirpath, _dirs, files in os.walk(checkpoint):
        for name in files:
            path = Path(dirpath) / name
            st = path.lstat()
            listing[str(path.relative_to(checkpoint))] = [st.st_size, st.st_mtime_ns]
    return listing


class RecordSaves(TrainerCallback):
    """After each save (the checkpoint, trainer_state.json last, is fully written): what is on disk."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.saves: list[dict[str, Any]] = []

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        checkpoint = self.run_dir / f"checkpoint-{state.global_step}"
        self.saves.append(
            {
                "t": time.time(),
                "global_step": state.global_step,
                "epoch": state.epoch,
                "checkpoint": checkpoint.name,
                "best_global_step": state.best_global_step,
                "best_model_checkpoint": state.best_model_checkpoint,
                "checkpoints_on_disk": checkpoint_names(self.run_dir),
                "dir_mtime_ns": checkpoint.stat().st_mtime_ns,
                "files": file_listing(checkpoint),
            }
        )


class SleepPerStep(TrainerCallback):
    """Stretch the run over real wall time, so the watcher sees saves arrive one by one. With `longest`,
    each step sleeps a random time in [seconds, longest] drawn from its own RNG (the training's RNGs are
    left alone)."""

    def __init__(self, seconds: float, longest: float | None = None, seed: int = 0) -> None:
        self.seconds = seconds
        self.longest = longest
        self.rng = random.Random(seed)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        pause = self.seconds if self.longest is None else self.rng.uniform(self.seconds, self.longest)
        if pause > 0:
            time.sleep(pause)


class WarningCatcher(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class ObservedTrainer(Trainer):
    """The stock Trainer; it only notes what happens around its end-of-training load of the best model
    (which logs a warning instead of failing when the best checkpoint's weights are missing)."""

    load_best: dict[str, Any]

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        self.load_best = {
            "called": True,
            "best_model_checkpoint": best,
            "best_dir_existed": bool(best) and os.path.isdir(best),
            "weights_existed": bool(best) and os.path.isfile(os.path.join(best, "model.safetensors")),
        }
        super()._load_best_model()


def weights_match(model: torch.nn.Module, checkpoint: Path) -> tuple[bool, str]:
    """Does the model hold exactly the weights saved in `checkpoint`?"""
    saved = load_file(os.fspath(checkpoint / "model.safetensors"))
    current = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    missing = sorted(set(saved) - set(current))
    if missing:
        return False, f"saved tensors the model does not have: {missing[:5]}"
    differing = sorted(k for k, v in saved.items() if not torch.equal(v, current[k]))
    if differing:
        return False, f"{len(differing)} of {len(saved)} tensors differ from the best checkpoint, e.g. {differing[:3]}"
    return True, f"all {len(saved)} saved tensors equal"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("output_dir", type=Path)
    p.add_argument("--summary", type=Path, required=True, help="where to write the summary JSON")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--save-steps", type=int, default=10, help="evaluate and save every this many steps")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    p.add_argument("--step-sleep-max", type=float, default=None, help="sleep a random time up to this instead")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: all epochs)")
    p.add_argument("--save-total-limit", type=int, default=None, help="the Trainer's own rotation (default off)")
    p.add_argument("--learning-rate", type=float, default=0.01)
    p.add_argument("--train-noise", type=float, default=0.1, help="share of train labels flipped")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def train(opts: argparse.Namespace, summary: dict[str, Any]) -> None:
    out: Path = opts.output_dir
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    torch.manual_seed(opts.seed)
    torch.set_num_threads(1)

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=os.fspath(out),
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        save_total_limit=opts.save_total_limit,
        eval_strategy="steps",
        save_strategy="steps",
        eval_steps=opts.save_steps,
        save_steps=opts.save_steps,
        logging_steps=opts.save_steps,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        per_device_train_batch_size=8,
        per_device_eval_batch_size=32,
        learning_rate=opts.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        seed=opts.seed,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    recorder = RecordSaves(out)
    callbacks: list[TrainerCallback] = [recorder]
    if opts.step_sleep > 0 or opts.step_sleep_max:
        callbacks.append(SleepPerStep(opts.step_sleep, opts.step_sleep_max, seed=opts.seed))
    trainer = ObservedTrainer(
        model=model,
        args=args,
        train_dataset=SyntheticRows(N_TRAIN, seed=1, noise=opts.train_noise),
        eval_dataset=SyntheticRows(N_EVAL, seed=2, noise=0.0),
        callbacks=callbacks,
    )
    trainer.load_best = {"called": False}
    catcher = WarningCatcher()
    logging.getLogger("transformers").addHandler(catcher)
    summary["saves"] = recorder.saves
    t0 = time.monotonic()
    try:
        trainer.train()
    finally:
        summary["train_seconds"] = time.monotonic() - t0
        summary["log_history"] = trainer.state.log_history
        summary["global_step"] = trainer.state.global_step
        summary["best_global_step"] = trainer.state.best_global_step
        summary["best_model_checkpoint"] = trainer.state.best_model_checkpoint
        summary["best_metric"] = trainer.state.best_metric
        summary["load_best"] = trainer.load_best
        summary["warnings"] = catcher.messages

    load_best = trainer.load_best
    load_best["not_found_warning"] = any(NOT_FOUND_WARNING in m for m in catcher.messages)
    best = trainer.state.best_model_checkpoint
    if best and os.path.isdir(best):
        load_best["weights_equal_best"], load_best["weights_detail"] = weights_match(trainer.model, Path(best))
    else:
        load_best["weights_equal_best"], load_best["weights_detail"] = False, f"best checkpoint {best} is gone"
    summary["best_model_loaded"] = bool(
        load_best["called"]
        and load_best["best_dir_existed"]
        and load_best["weights_existed"]
        and not load_best["not_found_warning"]
        and load_best["weights_equal_best"]
    )


def main(argv: list[str]) -> int:
    opts = parse_args(argv)
    summary: dict[str, Any] = {
        "argv": argv,
        "ok": False,
        "error": None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    try:
        train(opts, summary)
        summary["ok"] = True
    except BaseException as e:
        summary["error"] = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()}
        raise
    finally:
        out: Path = opts.output_dir
        summary["final_listing"] = sorted(os.listdir(out)) if out.is_dir() else None
        opts.summary.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    print(
        f"trained {summary['global_step']} steps in {summary['train_seconds']:.1f} s; "
        f"best {summary['best_model_checkpoint']} ({summary['best_metric']}); "
        f"best model loaded: {summary['best_model_loaded']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
