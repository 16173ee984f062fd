"""Recovery after one-shot pruning of a causal LM: a short next-token fine-tune with the pruning mask fixed, and the
perplexity after it. ``--method dense`` fine-tunes the unpruned model with the same budget: the training text
(CoNLL-2003 train) has the evaluation text's domain, so part of any gain is adaptation, not recovery.

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 nohup nice -n 10 python scripts/llm_recover.py \
        --out results/oneshot/smollm2 --method sparsegpt --setting 2:4 --steps 50 &

The model is pruned as by ``scripts/llm_oneshot.py`` (the library's `prune_sequential`, same calibration windows
and seed), fine-tuned with AdamW
on random ``--train-seqlen`` windows of the training text (another seed than the calibration), and scored on the
same evaluation windows. Rows go to ``<out>/recovery.json`` (atomically; a row already there is skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_trainer.data.text import load_text, random_windows, tokenize_text, window_batches
from prune_trainer.devices import device_description
from prune_trainer.io import atomic_write_json
from prune_trainer.llm.models import EMBEDDED_LLM, load_causal_lm
from prune_trainer.llm.perplexity import perplexity
from prune_trainer.masking.inject import DEFAULT_EXCLUDE, find_target_linears
from prune_trainer.masking.sparsity import weight_sparsity_report
from prune_trainer.oneshot.calibration import prune_sequential
from prune_trainer.oneshot.registry import get_method
from scripts.llm_oneshot import parse_setting, provenance


def fixed_mask_finetune(
    model: nn.Module, windows: torch.Tensor, masks: dict[str, torch.Tensor], lr: float, batch_size: int = 1,
    warmup: int = 10,
) -> list[float]:
    """AdamW (no weight decay) on the next-token loss over ``windows`` (``(steps·batch, seqlen)``), linear warm-up.
    The gradients of pruned weights are zeroed before each step (Adam then leaves them at 0) and the weights are
    set back to ``M ⊙ W`` after it, so the sparsity pattern stays fixed. Returns the loss of every step."""
    linears = {n: model.get_submodule(n) for n in masks}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    losses = []
    model.train()
    for batch in windows.split(batch_size):
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"non-finite loss {float(loss)} at fine-tuning step {len(losses)}")
        loss.backward()
        for name, lin in linears.items():
            lin.weight.grad.mul_(masks[name])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name, lin in linears.items():
                lin.weight.mul_(masks[name])
        losses.append(round(float(loss), 4))
    model.eval()
    return losses


def block_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep masks (``W != 0``) of every pruning target (the family preset: every Linear in the decoder blocks)."""
    return {n: model.get_submodule(n).weight != 0 for n in find_target_linears(model, None, DEFAULT_EXCLUDE)}


def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of the pruning targets."""
    names = find_target_linears(model, None, DEFAULT_EXCLUDE)
    return float(weight_sparsity_report(model, names)["global_sparsity"])


def prune_model(model: nn.Module, ids: torch.Tensor, method: str, setting: str,
                args: argparse.Namespace) -> dict[str, Any]:
    """Prune ``model`` in place as a grid row of ``scripts/llm_oneshot.py`` (`prune_sequential`, the calibration
    windows of the token sequence ``ids``); the row's sparsity, pattern and pruning time."""
    sparsity, pattern, n, m = parse_setting(setting)
    batches = window_batches(ids, args.calib, args.batch_size, args.seqlen, args.seed)
    t0 = time.perf_counter()
    prune_sequential(model, batches, get_method(method), sparsity, n, m, progress=False)
    return {"sparsity": sparsity, "pattern": pattern, "prune_time_s": round(time.perf_counter() - t0, 2)}


def evaluate_row(model: nn.Module, eval_ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity over the non-overlapping ``--seqlen`` windows (``--eval-windows`` evenly spaced ones)."""
    r = perplexity(model, eval_ids, args.seqlen, batch_size=args.eval_batch_size, max_windows=args.eval_windows)
    return {"perplexity": round(r.perplexity, 4), "nll": round(r.nll, 6), "eval_tokens": r.n_tokens,
            "eval_windows": r.n_windows, "eval_time_s": round(r.time_s, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out_path = Path(args.out) / "recovery.json"
    rows = json.loads(out_path.read_text()) if out_path.is_file() else {}
    key = f"{args.method}+ft|{args.setting}|uniform|n{args.calib}|w{args.eval_windows}|steps{args.steps}"
    if key in rows:
        print(f"skip {key}: already in {out_path}")
        return
    model, tokenizer = load_causal_lm(args.model)
    row: dict[str, Any] = {"model": args.model, "method": args.method, "setting": args.setting}
    train_ids = tokenize_text(load_text(args.calib_source), tokenizer)
    if args.method != "dense":
        row.update(prune_model(model, train_ids, args.method, args.setting, args))
    else:
        row.update(sparsity=0.0, pattern="dense", prune_time_s=0.0)
    masks = block_masks(model) if args.method != "dense" else {}
    train = random_windows(train_ids, args.steps * args.train_batch, args.train_seqlen, seed=args.seed + 1)
    t0 = time.perf_counter()
    losses = fixed_mask_finetune(model, train, masks, args.lr, args.train_batch)
    row.update(finetune_steps=args.steps, finetune_tokens=train.numel(), finetune_lr=args.lr,
               finetune_time_s=round(time.perf_counter() - t0, 1), finetune_losses=losses,
               measured_sparsity=round(measured_sparsity(model), 6))
    row.update(evaluate_row(model, tokenize_text(load_text(args.eval_source), tokenizer), args))
    row.update(provenance(args, device_description(torch.device("cpu"))))
    rows[key] = row
    atomic_write_json(out_path, rows)
    print(json.dumps({k: row[k] for k in ("method", "setting", "perplexity", "finetune_time_s")}), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_LLM)
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="sparsegpt", help="sparsegpt | wanda | magnitude | dense")
    p.add_argument("--setting", default="2:4")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-seqlen", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--calib-source", default="conll-train")
    p.add_argument("--eval-source", default="conll-validation")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
