"""oBERT under torch.distributed: 2 CPU processes (gloo), each collecting m/2 gradients on its own data.

Every rank must end with identical masks and weights, equal to what one process gets from all m
gradients (the sampler gives rank r the mini-batches j ≡ r mod 2 of the single-process draw).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import end_process_group, tiny_bert, tiny_datasets
from transformers import DataCollatorForTokenClassification

from prune_trainer.callbacks.obert import OBERTPruningCallback
from prune_trainer.methods.obert.sampler import GradientSampler

OPTS = dict(num_grads=8, block_size=8, grad_batch_size=4, grad_chunk=3, verbose=False)
FORMS = ("direct", "woodbury")


def _prune(form: str) -> dict[str, torch.Tensor]:
    train, _, tok = tiny_datasets(32)
    sampler = GradientSampler(train, DataCollatorForTokenClassification(tok), 4, seed=0)
    model = tiny_bert(seed=4)
    cb = OBERTPruningCallback(model, sampler=sampler, fisher_form=form, **OPTS)
    cb.prune_step(0.5, step=0)
    cb.current_target = 0.5
    cb.prune_step(0.7, step=4)
    out = {}
    for name, layer in cb.layers.items():
        out[name + ".weight"] = layer.weight.detach().clone()
        out[name + ".mask"] = layer.weight_mask.clone()
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for form in FORMS:  # direct: all-reduce of Σ GᵀG; woodbury: all-gather of each gradient chunk
            torch.save(_prune(form), os.path.join(out_dir, f"{form}_rank{rank}.pt"))
        end_process_group()  # barrier + destroy: no rank tears down while the other still talks
    finally:  # on an error: no barrier (the other rank may never reach it), just destroy
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    before = torch.get_num_threads()
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    torch.set_num_threads(before)
    return out


@pytest.mark.parametrize("form", FORMS)
def test_two_ranks_agree_with_each_other_and_with_one_process(ddp_results, form):
    r0, r1 = (torch.load(ddp_results / f"{form}_rank{r}.pt", weights_only=True) for r in range(2))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    single = _prune(form)
    torch.set_num_threads(before)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ on {key}"
        if key.endswith(".mask"):
            assert torch.equal(r0[key], single[key]), f"DDP mask differs from single process on {key}"
        else:
            torch.testing.assert_close(r0[key], single[key], rtol=1e-4, atol=1e-6)
    masks = [v for k, v in r0.items() if k.endswith(".mask")]
    assert 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks) == pytest.approx(0.7, abs=1e-3)


def test_ranks_draw_disjoint_batches():
    train, _, tok = tiny_datasets(32)
    coll = DataCollatorForTokenClassification(tok)
    idx = [GradientSampler(train, coll, 4, rank=r, world_size=2).batch_indices(4, 0) for r in range(2)]
    assert not {i for b in idx[0] for i in b} & {i for b in idx[1] for i in b}
