"""Training step time: movement pruning vs dense, side by side in one run (plain `Trainer`, same data).

Each variant (dense, hard movement, soft movement, and optionally hard movement + distillation) trains
``--steps`` optimizer steps on the same synthetic token batches; the median step time (``on_step_begin`` →
``on_step_end``, after ``--warmup`` steps) is compared with dense. Variants run interleaved for ``--rounds``
rounds so that load drift on a shared machine hits all of them alike. A second table times the mask
selection alone (per-layer and global top-k via ``kthvalue``, vs a full sort) on the model's scores.

    python benchmarks/bench_movement.py                      # embedded MiniLM, batch 32 x 128 tokens
    python benchmarks/bench_movement.py --steps 4 --seq-len 32 --batch-size 8 --rounds 1   # quick check

Target: hard movement pruning step time ≤ 1.25 × dense.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from prune_trainer.callbacks.distillation import DistillationCallback
from prune_trainer.callbacks.movement import MovementPruningCallback
from prune_trainer.methods.movement import hard_movement_masks
from prune_trainer.models import load_model_and_tokenizer


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, num_labels: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1000, vocab, (n, seq_len), generator=g)
        self.labels = torch.randint(0, num_labels, (n, seq_len), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def run_variant(variant: str, model_name: str, data: RandomTokens, args: argparse.Namespace) -> list[float]:
    model, _ = load_model_and_tokenizer(model_name)
    callbacks: list[TrainerCallback] = []
    if variant != "dense":
        kind = "soft" if variant == "soft" else "hard"
        callbacks.append(
            MovementPruningCallback(
                model, variant=kind, final_sparsity=0.9, start_step=0, end_step=1.0, frequency=1,
                scope=args.scope, final_lambda=100.0,
            )
        )
    if variant == "hard+kd":
        teacher, _ = load_model_and_tokenizer(model_name)
        callbacks.append(DistillationCallback(model, teacher, alpha=0.5, temperature=2.0))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.warmup + args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=1e-4, weight_decay=0.01, save_strategy="no", eval_strategy="no", report_to="none",
            logging_steps=10_000, disable_tqdm=True, seed=0, dataloader_num_workers=0,
            use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=targs, train_dataset=data, callbacks=[*callbacks, timer]).train()
    return timer.times[args.warmup :]


def time_fn(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round and variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scope", default="layer", choices=["layer", "global"])
    parser.add_argument("--kd", action="store_true", help="also time hard movement + distillation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, _ = load_model_and_tokenizer(args.model)
    data = RandomTokens(
        args.batch_size * (args.warmup + args.steps), args.seq_len, model.config.vocab_size, model.config.num_labels
    )
    variants = ["dense", "hard", "soft"] + (["hard+kd"] if args.kd else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            times[v] += run_variant(v, args.model, data, args)

    dense = statistics.median(times["dense"])
    print(f"device: {'cuda' if torch.cuda.is_available() else 'cpu'}, torch threads {torch.get_num_threads()}, "
          f"model {args.model}, batch {args.batch_size} x {args.seq_len} tokens, "
          f"{args.rounds} rounds x {args.steps} steps, scope {args.scope}")
    print(f"{'variant':<10} {'median step (s)':>16} {'ratio to dense':>15}")
    for v in variants:
        med = statistics.median(times[v])
        print(f"{v:<10} {med:>16.4f} {med / dense:>15.3f}")

    # Mask selection alone, on scores the size of the model's target layers.
    cb = MovementPruningCallback(model, final_sparsity=0.9)
    scores = {n: torch.randn_like(p) for n, p in zip(cb.layers, cb.score_params(), strict=True)}
    n = sum(s.numel() for s in scores.values())
    per_layer = time_fn(lambda: hard_movement_masks(scores, 0.9, "layer"), 5)
    global_ = time_fn(lambda: hard_movement_masks(scores, 0.9, "global", 0.01), 5)
    full_sort = time_fn(lambda: torch.cat([s.reshape(-1) for s in scores.values()]).sort(), 5)
    print(f"\nmask selection on {n:,} scores (median of 5):")
    for name, t in (("per-layer kthvalue", per_layer), ("global kthvalue", global_), ("global full sort", full_sort)):
        print(f"{name:<20} {t:>8.4f} s  = {t / dense:6.3f} x dense step")


if __name__ == "__main__":
    main()
