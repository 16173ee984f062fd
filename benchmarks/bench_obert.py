"""Cost of one oBERT pruning step on the embedded model, split into its parts, measured side by side.

Prints, for one run on this machine:
1. gradient collection: seconds per mini-batch gradient of all target layers;
2. Fisher inverse: Woodbury (rank-1 per gradient) vs direct (Σ GᵀG + batched Cholesky inverse) on the
   same gradients, layer by layer, with their ratio and their max relative disagreement;
3. scoring and the OBS update (joint vs summed) for a one-shot step to ``--sparsity``;
4. the loss on held-out batches after that step with no update / summed / joint update (same masks);
5. one full `OBERTPruningCallback.prune_step` (the callback's own timing split) and the peak memory.

Usage (small sizes take about a minute or two on 2 CPU cores)::

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 python benchmarks/bench_obert.py \
        --num-grads 16 --grad-batch-size 8 --block-size 50 --sparsity 0.5

``--model results/dense/model`` scores a fine-tuned model (the loss comparison means more there).
Without CoNLL data it uses random word sequences (timings only).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import resource
import sys
import time
from dataclasses import dataclass

import torch
from transformers import DataCollatorForTokenClassification

from prune_trainer.callbacks.obert import OBERTPruningCallback
from prune_trainer.masking.inject import inject_masked_layers
from prune_trainer.masking.selection import select_masks
from prune_trainer.methods.obert.fisher import BlockFisherInverse, fisher_inverse_bytes, format_bytes
from prune_trainer.methods.obert.sampler import GradientSampler, model_loss
from prune_trainer.methods.obert.update import obs_scores, obs_update
from prune_trainer.models import load_model_and_tokenizer
from prune_trainer.oneshot.evaluation import evaluate_f1
from prune_trainer.provenance import git_commit


def peak_rss() -> int:
    """Peak resident memory of this process so far (bytes; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_data(tokenizer, n: int, max_length: int):
    from prune_trainer.data import Sentence, load_conll_splits, tokenize_and_align

    try:
        splits = load_conll_splits()
        train, valid = splits["train"], splits["validation"]
        source = "CoNLL-2003"
        raw_valid = valid
    except Exception as err:  # no local data and no hub: random words, for timing only
        print(f"(no CoNLL data: {err}; using random word sequences)")
        rng = random.Random(0)
        vocab = [w for w in tokenizer.get_vocab() if w.isalpha()][:5000]
        labels = ["O", "B-PER", "I-PER", "B-LOC"]

        def fake(k):
            out = []
            for _ in range(k):
                words = [rng.choice(vocab) for _ in range(rng.randint(8, 30))]
                out.append(Sentence(words, [rng.choice(labels) for _ in words]))
            return out

        train, valid, source = fake(n), fake(n), "random"
        raw_valid = None
    return (
        tokenize_and_align(train, tokenizer, max_length, n),
        tokenize_and_align(valid, tokenizer, max_length, n),
        source,
        raw_valid,
    )


@torch.no_grad()
def heldout_loss(model, sampler: GradientSampler, batches: int) -> float:
    model.eval()
    device = next(model.parameters()).device
    losses = [float(model_loss(model, sampler._batch(idx, device))) for idx in sampler.batch_indices(batches, 999)]
    return sum(losses) / len(losses)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--num-grads", type=int, default=16)
    p.add_argument("--grad-batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=50)
    p.add_argument("--damp", type=float, default=1e-7)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--max-layers", type=int, default=None, help="time only the first N target layers")
    p.add_argument("--samples", type=int, default=2000, help="sentences to draw batches from")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--skip-woodbury", action="store_true", help="skip the (slower on CPU) Woodbury timing")
    p.add_argument("--grad-chunk", type=int, default=16,
                   help="with --skip-woodbury: gradients per batched Fisher call (the callback's grad_chunk)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eval-f1", action="store_true",
                   help="also the full-validation entity F1 after the one-shot step, per update mode (CoNLL only)")
    p.add_argument("--out", default=None, help="write <out>.json and <out>.md with the measurements")
    return p.parse_args(argv)


@dataclass
class Setup:
    """The model with masked target layers, its data samplers, and the sizes printed in the header."""

    model: torch.nn.Module
    tok: object
    layers: dict
    names: list[str]
    sampler: GradientSampler
    eval_sampler: GradientSampler
    raw_valid: list | None
    device: torch.device
    source: str
    d: int
    fbytes: int


def setup(a: argparse.Namespace) -> Setup:
    """Load the model and data; print the device, data and the Fisher inverse's size."""
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_model_and_tokenizer(a.model)
    model.to(device)
    layers = inject_masked_layers(model)
    names = list(layers)[: a.max_layers] if a.max_layers else list(layers)
    train, valid, source, raw_valid = load_data(tok, a.samples, a.max_length)
    coll = DataCollatorForTokenClassification(tok)
    d = sum(layers[n].weight.numel() for n in names)
    fbytes = sum(fisher_inverse_bytes(layers[n].weight.numel(), a.block_size) for n in names)
    print(f"device: {device} ({torch.get_num_threads()} threads); data: {source}; model: {a.model}")
    print(f"{len(names)} target layers, d={d:,} weights, B={a.block_size}, m={a.num_grads} gradients of "
          f"{a.grad_batch_size} sentences; Fisher inverse (float32, all layers) = {format_bytes(fbytes)}")
    return Setup(model, tok, layers, names, GradientSampler(train, coll, a.grad_batch_size, seed=0),
                 GradientSampler(valid, coll, 16, seed=1), raw_valid, device, source, d, fbytes)


def check_memory(a: argparse.Namespace, st: Setup) -> None:
    """With Woodbury timed too, the m gradients are kept (m·d·4 bytes): refuse when that would not fit."""
    if a.skip_woodbury:
        return
    grad_bytes = a.num_grads * st.d * 4
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"keeping {a.num_grads} gradients for the side-by-side Fisher timing: {format_bytes(grad_bytes)}")
    if grad_bytes + 2 * st.fbytes > 0.8 * total:
        raise SystemExit(
            f"--num-grads {a.num_grads} needs {format_bytes(grad_bytes)} of stored gradients plus "
            f"{format_bytes(2 * st.fbytes)} of Fisher blocks, more than 80% of this machine's "
            f"{format_bytes(total)}: pass --skip-woodbury (gradients then stream into the direct form)"
        )


def _new_fisher(a: argparse.Namespace, st: Setup, name: str, form: str) -> BlockFisherInverse:
    return BlockFisherInverse(st.layers[name].weight.numel(), a.block_size, a.num_grads, a.damp, form,
                              device=st.device)


def collect_gradients(a: argparse.Namespace, st: Setup, record: dict
                      ) -> tuple[list[list[torch.Tensor]], dict[str, BlockFisherInverse], float]:
    """1. The m gradients: kept per layer, or (``--skip-woodbury``) streamed in chunks into direct Fisher
    inverses; returns the kept gradients, the streamed inverses and the seconds spent in those Fisher calls."""
    params = [st.layers[n].weight for n in st.names]
    finvs = {n: _new_fisher(a, st, n, "direct") for n in st.names} if a.skip_woodbury else {}
    grads: list[list[torch.Tensor]] = [[] for _ in st.names]
    t_fisher = 0.0

    def flush() -> float:
        """One batched Fisher call per layer for the buffered chunk; returns its time."""
        t_f = time.perf_counter()
        for n, buf in zip(st.names, grads, strict=True):
            finvs[n].add_grads(torch.stack(buf))
            buf.clear()
        return time.perf_counter() - t_f

    t = time.perf_counter()
    for gs in st.sampler.sample(st.model, params, a.num_grads, round_key=0):
        for buf, g in zip(grads, gs, strict=True):
            buf.append(g)
        if a.skip_woodbury and len(grads[0]) == a.grad_chunk:
            t_fisher += flush()
    if a.skip_woodbury and grads[0]:  # the last, partial chunk (whatever number of gradients the sampler gave)
        t_fisher += flush()
    t_collect = time.perf_counter() - t - t_fisher
    record.update(device=f"{st.device} ({torch.get_num_threads()} threads)", data=st.source, layers=len(st.names),
                  d=st.d, fisher_bytes=st.fbytes, collect_s=t_collect)
    print(f"\n[collect] {t_collect:.2f} s for {a.num_grads} gradients = {t_collect / a.num_grads:.3f} s/gradient")
    return grads, finvs, t_fisher


def fisher_inverses(a: argparse.Namespace, st: Setup, record: dict) -> dict[str, BlockFisherInverse]:
    """2. Fisher inverses: streamed direct form, or Woodbury vs direct on the same gradients, one layer at a
    time (peak = one layer's blocks), with their max relative disagreement."""
    grads, finvs, t_fisher = collect_gradients(a, st, record)
    times = {"woodbury": 0.0, "direct": 0.0}
    worst = 0.0
    if a.skip_woodbury:
        t = time.perf_counter()
        for f in finvs.values():
            f.finalize()
        times["direct"] = t_fisher + time.perf_counter() - t
    else:
        for n, layer_grads in zip(st.names, grads, strict=True):
            stacked, built = torch.stack(layer_grads), {}
            for form in ("direct", "woodbury"):
                t = time.perf_counter()
                built[form] = _new_fisher(a, st, n, form)
                built[form].add_grads(stacked)
                built[form].finalize()
                times[form] += time.perf_counter() - t
            ref, other = built["direct"].blocks, built["woodbury"].blocks
            worst = max(worst, float((other - ref).abs().max() / ref.abs().max()))
            finvs[n] = built["direct"]
    record.update(fisher_direct_s=times["direct"], fisher_woodbury_s=None if a.skip_woodbury else times["woodbury"],
                  fisher_max_rel_diff=None if a.skip_woodbury else worst)
    print(f"[fisher] direct {times['direct']:.2f} s" + (
        "" if a.skip_woodbury else
        f" | woodbury {times['woodbury']:.2f} s | woodbury/direct = {times['woodbury'] / times['direct']:.2f}x"
        f" | max |ΔF⁻¹|/max|F⁻¹| = {worst:.2e}"))
    return finvs


def score_and_update(a: argparse.Namespace, st: Setup, finvs: dict[str, BlockFisherInverse], record: dict
                     ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """3. Scores ``w² / (2 [F⁻¹]_ii)``, one global mask, and the weights after each update mode (same masks)."""
    t = time.perf_counter()
    scores = {n: obs_scores(st.layers[n].weight, finvs[n]) for n in st.names}
    masks = select_masks(scores, a.sparsity, "global")
    t_score = time.perf_counter() - t
    new_w, t_upd = {}, {}
    for mode in ("none", "summed", "joint"):
        t = time.perf_counter()
        new_w[mode] = {n: obs_update(st.layers[n].weight, ~masks[n], finvs[n], mode) for n in st.names}
        t_upd[mode] = time.perf_counter() - t
    record.update(score_s=t_score, update_summed_s=t_upd["summed"], update_joint_s=t_upd["joint"])
    print(f"[score] {t_score:.2f} s | [update] summed {t_upd['summed']:.2f} s, joint {t_upd['joint']:.2f} s "
          f"(joint/summed = {t_upd['joint'] / max(t_upd['summed'], 1e-9):.2f}x)")
    return masks, new_w


def evaluate_updates(a: argparse.Namespace, st: Setup, masks: dict[str, torch.Tensor],
                     new_w: dict[str, dict[str, torch.Tensor]], record: dict) -> None:
    """4. Held-out loss (and with ``--eval-f1`` the validation F1) after the one-shot step, per update mode."""
    with_f1 = a.eval_f1 and st.raw_valid is not None
    base = heldout_loss(st.model, st.eval_sampler, a.eval_batches)
    line = [f"dense {base:.4f}"]
    record["heldout_loss"] = {"dense": base}
    f1s: dict[str, float] = {}
    if with_f1:
        f1s["dense"] = evaluate_f1(st.model, st.tok, st.raw_valid, max_length=a.max_length)["f1"]
    for mode, ws in new_w.items():
        m = copy.deepcopy(st.model)
        ml = {k: v for k, v in m.named_modules() if k in ws}
        with torch.no_grad():
            for n, w in ws.items():
                ml[n].weight.copy_(w * masks[n])  # pruned weights exactly zero in every mode
        record["heldout_loss"][mode] = heldout_loss(m, st.eval_sampler, a.eval_batches)
        line.append(f"{mode} {record['heldout_loss'][mode]:.4f}")
        if with_f1:
            f1s[mode] = evaluate_f1(m, st.tok, st.raw_valid, max_length=a.max_length)["f1"]
        del m
    print(f"[loss @ {a.sparsity:.0%} one-shot, {a.eval_batches} held-out batches] " + " | ".join(line))
    if f1s:
        record["validation_f1"] = f1s
        print(f"[validation F1 @ {a.sparsity:.0%} one-shot, no fine-tuning] "
              + " | ".join(f"{k} {v:.4f}" for k, v in f1s.items()))


def callback_step(a: argparse.Namespace, st: Setup, record: dict) -> None:
    """5. One full callback step (collect → Fisher → score → joint update), all target layers at once; peak memory."""
    cb = OBERTPruningCallback(
        st.model, num_grads=a.num_grads, block_size=a.block_size, damp=a.damp, grad_batch_size=a.grad_batch_size,
        sampler=st.sampler, verbose=True,
    )
    if a.max_layers:
        cb.layers = {n: cb.layers[n] for n in st.names}
    t = time.perf_counter()
    cb.prune_step(a.sparsity)
    total = time.perf_counter() - t
    s = cb.stats[-1]
    print(f"[prune_step] total {total:.2f} s: collect {s['collect_s']:.2f} | fisher {s['fisher_s']:.2f} | "
          f"score {s['score_s']:.2f} | update {s['update_s']:.2f}")
    if st.device.type == "cuda":
        print(f"[memory] peak GPU allocated {format_bytes(torch.cuda.max_memory_allocated())}")
    print(f"[memory] peak RSS of this process {format_bytes(peak_rss())}")
    record.update(prune_step={"total_s": total, **{k: s[k] for k in ("collect_s", "fisher_s", "score_s", "update_s")}},
                  peak_rss_bytes=peak_rss())


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    record: dict = {"command": " ".join(["python", *sys.argv]), "git_commit": git_commit(), "args": vars(a)}
    st = setup(a)
    check_memory(a, st)
    finvs = fisher_inverses(a, st, record)
    masks, new_w = score_and_update(a, st, finvs, record)
    evaluate_updates(a, st, masks, new_w, record)
    del finvs, new_w
    callback_step(a, st, record)
    if a.out:
        write_record(record, a.out)
    return 0


def write_record(record: dict, out: str) -> None:
    """``<out>.json`` (everything) and ``<out>.md`` (the side-by-side table)."""
    import json
    from pathlib import Path

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    a = record["args"]
    rows = [
        f"# One oBERT pruning step on `{a['model']}` ({record['data']}, {record['device']})",
        "",
        f"{record['layers']} target layers, d = {record['d']:,} weights, B = {a['block_size']}, m = {a['num_grads']} "
        f"gradients of {a['grad_batch_size']} sentences, one-shot to {a['sparsity']:.0%} (global), no fine-tuning.",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| gradient collection (m gradients) | {record['collect_s']:.2f} |",
        f"| Fisher inverse, direct (Σ GᵀG + batched Cholesky inverse) | {record['fisher_direct_s']:.2f} |",
    ]
    if record.get("fisher_woodbury_s") is not None:
        rows.append(f"| Fisher inverse, Woodbury (rank-1 per gradient) | {record['fisher_woodbury_s']:.2f} |")
    rows += [
        f"| scores + global mask | {record['score_s']:.2f} |",
        f"| OBS update, summed single-weight form | {record['update_summed_s']:.2f} |",
        f"| OBS update, joint per-block solve | {record['update_joint_s']:.2f} |",
        f"| callback `prune_step` total (collect → Fisher → score → joint update) "
        f"| {record['prune_step']['total_s']:.2f} |",
        "",
        f"Peak RSS of the process: {record['peak_rss_bytes'] / 2**30:.2f} GiB.",
    ]
    if record.get("fisher_max_rel_diff") is not None:
        rows.append(f"Woodbury vs direct: max |ΔF⁻¹| / max |F⁻¹| = {record['fisher_max_rel_diff']:.1e}.")
    has_f1 = "validation_f1" in record
    rows += ["", "| weights after the step | held-out loss |" + (" validation F1 |" if has_f1 else ""),
             "|---|---|" + ("---|" if has_f1 else "")]
    for mode, loss in record["heldout_loss"].items():
        f1 = record.get("validation_f1", {}).get(mode)
        rows.append(f"| {mode} | {loss:.4f} |" + (f" {f1:.4f} |" if f1 is not None else ""))
    rows += ["", f"Command: `{record['command']}`  ", f"git commit: `{record['git_commit']}`", ""]
    path.with_suffix(".md").write_text("\n".join(rows))
    print(f"wrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
