"""A tiny causal language model trained by the real Hugging Face Trainer, and the lm-evaluation-harness tasks
that score it, for the end-to-end test with a real `lm_eval` (CPU only, fully offline).

    python tests/e2e/train_lm.py OUTPUT_DIR --tasks TASK_DIR --saves SAVES.jsonl
        [--max-steps 160] [--save-steps 40] [--step-sleep 0]

Adapted from ../shared/reference/eval_lm.py (which made tests/fixtures/lm-eval): a synthetic "world" where
every person likes one fruit; training lines state these facts (20% noise) among filler sentences, so the
harness's scores move from checkpoint to checkpoint. A byte-level BPE tokenizer is trained
here (no hub access) and saved with every checkpoint (`processing_class`), so `lm_eval --model hf
--model_args pretrained=CHECKPOINT` loads a checkpoint as it is. GPT-2 with 2 layers, n_embd 64 (133k
parameters); the Trainer evaluates (eval_loss) and saves every `--save-steps` steps.

Before training, TASK_DIR gets the harness task `synth_ppl` (loglikelihood_rolling over 32 true lines,
`dataset_path: json`: word_perplexity, byte_perplexity, bits_per_byte) as lm_eval's `--include_path`. As in
tests/fixtures/lm-eval, its perplexity does not follow the Trainer's eval_loss (probably because the harness
puts EOS before each line and training never did; not investigated): the best checkpoints by it are early
ones (here, steps 40 and 80 of 160). After each save
(the Trainer has finished writing the checkpoint) one JSON line is appended to SAVES.jsonl: `{"step",
"checkpoint", "t"}`; that is how the eval job of the test learns that a checkpoint is ready.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

# Offline, quiet and hermetic before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
# different lengths, so acc_norm (length-normalised) can differ from acc
FRUITS = ["apples", "pears", "figs", "plums", "cherries", "bananas", "kiwis", "grapes", "mangoes", "limes"]
VERBS = ["likes", "eats", "buys", "wants"]
ADJS = ["red", "old", "small", "quick", "lazy", "green", "tall", "quiet"]
ANIMALS = ["fox", "dog", "cat", "owl", "horse", "mouse", "goat", "crow"]
ACTIONS = ["sees", "chases", "follows", "meets", "ignores", "finds"]
THINGS = ["river", "tree", "house", "field", "road", "fence", "barn", "hill"]
FACT = {n: FRUITS[(i * 3) % len(FRUITS)] for i, n in enumerate(NAMES)}

EOS = "<|endoftext|>"
SEQ_LEN = 16  # tokens per training row (lines are short)
N_TRAIN_LINES = 480  # batch 16 -> 30 optimizer steps per epoch
N_EVAL_LINES = 64  # the Trainer's own eval set (-> eval_loss in trainer_state.json)

TASK_YAML = """\
task: synth_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def make_line(rng: random.Random, fact_noise: float = 0.2) -> str:
    if rng.random() < 0.6:
        name = rng.choice(NAMES)
        fruit = FACT[name] if rng.random() >= fact_noise else rng.choice(FRUITS)
        return f"{name} {rng.choice(VERBS)} {fruit} ."
    return f"the {rng.choice(ADJS)} {rng.choice(ANIMALS)} {rng.choice(ACTIONS)} the {rng.choice(THINGS)} ."


def write_tasks(task_dir: Path, seed: int = 7) -> None:
    """The `synth_ppl` task: the perplexity of 32 true lines of the synthetic world."""
    rng = random.Random(seed)
    task_dir.mkdir(parents=True, exist_ok=True)
    data = task_dir / "synth_ppl.jsonl"
    data.write_text("".join(json.dumps({"text": make_line(rng, fact_noise=0.0)}) + "\n" for _ in range(32)))
    (task_dir / "synth_ppl.yaml").write_text(TASK_YAML.format(data=data), encoding="utf-8")


def build_tokenizer(lines: list[str]) -> Any:
    """A byte-level BPE tokenizer (as GPT-2's) trained on the synthetic corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, min_frequency=1, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=EOS, model_max_length=64
    )


def rows(lines: list[str], tok: Any) -> list[dict[str, Any]]:
    """Each line -> a fixed-length row: tokens + EOS, padded; labels = tokens, -100 on padding."""
    import torch

    out = []
    for line in lines:
        ids = [*tok(line)["input_ids"][: SEQ_LEN - 1], tok.eos_token_id]
        pad = SEQ_LEN - len(ids)
        out.append(
            {
                "input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                "labels": torch.tensor(ids + [-100] * pad),
            }
        )
    return out


def callbacks(opts: argparse.Namespace) -> list[Any]:
    """Note each finished save in SAVES.jsonl; sleep after each step if asked."""
    from transformers import TrainerCallback

    class NoteSaves(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            checkpoint = opts.output_dir / f"checkpoint-{state.global_step}"
            record = {"step": state.global_step, "checkpoint": os.fspath(checkpoint.resolve()), "t": time.time()}
            with opts.saves.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    class SleepPerStep(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            time.sleep(opts.step_sleep)

    return [NoteSaves(), *([SleepPerStep()] if opts.step_sleep > 0 else [])]


def train(opts: argparse.Namespace) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = random.Random(0)
    train_lines = [make_line(rng) for _ in range(N_TRAIN_LINES)]
    eval_lines = [make_line(rng) for _ in range(N_EVAL_LINES)]
    tok = build_tokenizer([*train_lines, " ".join(NAMES + FRUITS + VERBS)])
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=os.fspath(opts.output_dir), max_steps=opts.max_steps,
        eval_strategy="steps", eval_steps=opts.save_steps, save_strategy="steps", save_steps=opts.save_steps,
        logging_steps=opts.save_steps, per_device_train_batch_size=16, per_device_eval_batch_size=32,
        learning_rate=5e-3, warmup_steps=10, weight_decay=0.0, seed=42, report_to="none", use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = Trainer(
        model=GPT2LMHeadModel(config), args=args, processing_class=tok,  # tokenizer files in every checkpoint
        train_dataset=rows(train_lines, tok), eval_dataset=rows(eval_lines, tok),
        callbacks=callbacks(opts),
    )  # fmt: skip
    trainer.train()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("output_dir", type=Path)
    p.add_argument("--tasks", type=Path, required=True, help="write the lm-eval task here (--include_path)")
    p.add_argument("--saves", type=Path, required=True, help="append one JSON line per finished save")
    p.add_argument("--max-steps", type=int, default=160)
    p.add_argument("--save-steps", type=int, default=40, help="evaluate and save every this many steps")
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each optimizer step")
    opts = p.parse_args(argv)
    write_tasks(opts.tasks)
    started = time.monotonic()
    train(opts)
    print(f"trained {opts.max_steps} steps in {time.monotonic() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
