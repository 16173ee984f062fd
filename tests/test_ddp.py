import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_torchrun(script: Path, out: Path, nproc: int = 2, *extra: str, timeout: float = 600) -> None:
    """torchrun ``--standalone`` (its rendezvous binds a free port itself: no port picked here and freed before
    torchrun binds it). On a timeout torchrun gets SIGTERM, on which it stops its workers (they run in sessions
    of their own, out of reach of a kill of its process group), then its session is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           str(out), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {timeout:.0f} s (workers killed):\n{stdout[-3000:]}{stderr[-3000:]}")
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]


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


def test_a_hung_run_fails_and_leaves_no_worker(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import os, sys, time\nopen(os.path.join(sys.argv[1], f'pid{os.getpid()}'), 'w').close()\n"
                      "time.sleep(120)\n")
    with pytest.raises(pytest.fail.Exception, match="did not finish"):
        run_torchrun(script, tmp_path, 2, timeout=20)
    pids = [int(p.name[3:]) for p in tmp_path.glob("pid*")]
    assert len(pids) == 2
    for pid in pids:  # killed with the session: signal 0 finds no such process
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
