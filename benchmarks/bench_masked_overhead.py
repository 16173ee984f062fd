"""Training-step time: masked (magnitude pruning callback, 90% sparse) vs dense, side by side.

Both models are the embedded BERT with a token-classification head; the same batches are used,
and the two variants alternate round by round so that machine noise hits both alike. The masked
step includes the callback's work (gradient masking before and weight re-masking after the
optimizer step). Prints the median step time of each and their ratio.

    python benchmarks/bench_masked_overhead.py --steps 20 --rounds 5 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from prune_trainer import MagnitudePruningCallback
from prune_trainer.models import load_model_and_tokenizer


def make_batch(tokenizer, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, 9, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def time_steps(model, optimizer, batch, steps: int, pruner=None) -> list[float]:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if pruner is not None:
            pruner.on_pre_optimizer_step(None, None, None)
        optimizer.step()
        if pruner is not None:
            pruner.on_optimizer_step(None, None, None)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dense, tokenizer = load_model_and_tokenizer()
    masked, _ = load_model_and_tokenizer()
    pruner = MagnitudePruningCallback(masked, final_sparsity=0.9, start_step=0, end_step=0)
    pruner.schedule = pruner.config.schedule.resolve(1)
    pruner.update_masks(0)
    batch = make_batch(tokenizer, args.batch_size, args.seq_len)
    opt_dense = torch.optim.AdamW(dense.parameters(), lr=1e-5, weight_decay=0.01)
    opt_masked = torch.optim.AdamW(masked.parameters(), lr=1e-5, weight_decay=0.01)
    dense.train()
    masked.train()
    time_steps(dense, opt_dense, batch, 2)  # warm-up
    time_steps(masked, opt_masked, batch, 2, pruner)
    dense_times, masked_times = [], []
    for _ in range(args.rounds):
        dense_times += time_steps(dense, opt_dense, batch, args.steps)
        masked_times += time_steps(masked, opt_masked, batch, args.steps, pruner)
    d, m = statistics.median(dense_times), statistics.median(masked_times)
    result = {
        "dense_step_s": d,
        "masked_step_s": m,
        "overhead": m / d - 1,
        "steps_each": len(dense_times),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "threads": args.threads,
        "sparsity": pruner.sparsity()[0],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
