import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, out: Path, nproc: int = 2, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(script), str(out), *extra,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_magnitude_masks_identical_on_every_rank(tmp_path):
    run_torchrun(Path(__file__).parent / "ddp_worker.py", tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == 2
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        torch.testing.assert_close(r0["weights"][name], r1["weights"][name])
    kept = sum(int(m.sum()) for m in r0["masks"].values())
    total = sum(m.numel() for m in r0["masks"].values())
    assert abs((1 - kept / total) - 0.7) < 1e-3


@pytest.mark.parametrize("mode", ["movement", "movement-accum"])
def test_movement_with_clipping_is_bit_identical_on_every_rank(tmp_path, mode):
    """DDP does not average the score gradients (the scores join the optimizer after wrapping); the callback
    must, before the Trainer clips over all parameters (a rank's own score gradients in its clip norm would
    scale its weight update differently), so weights and scores stay bit-identical although each rank trains
    on its own data shard; with gradient accumulation the averaging runs once per optimizer step."""
    run_torchrun(Path(__file__).parent / "ddp_worker.py", tmp_path, 2, mode)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == 2 and r0["scores"]
    assert r0["averaged"] == r1["averaged"] == r0["optimizer_steps"] == 8
    moved = 0.0
    for name in r0["scores"]:
        assert torch.equal(r0["scores"][name], r1["scores"][name]), name
        moved = max(moved, float(r0["scores"][name].abs().max()))
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    assert moved > 0  # the scores did train


def test_structured_taylor_masks_and_weights_identical_on_every_rank(tmp_path):
    """Taylor group scores come from each rank's own gradients; the kept groups must agree across ranks."""
    run_torchrun(Path(__file__).parent / "ddp_worker.py", tmp_path, 2, "structured")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world_size"] == 2
    for name in r0["masks"]:
        assert torch.equal(r0["masks"][name], r1["masks"][name]), name
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    zeros = sum(int((w == 0).sum()) for w in r0["weights"].values())
    total = sum(w.numel() for w in r0["weights"].values())
    assert zeros / total == pytest.approx(0.5, abs=1e-3)
