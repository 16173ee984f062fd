"""Block-diagonal empirical Fisher inverse of one layer's flattened weights (oBERT, Kurtic et al. 2022).

The flattened weight vector (length d) is split into ``S = ⌈d/B⌉`` blocks of B consecutive weights
(the tail block zero-padded). Each block keeps ``F⁻¹ = (λI + (1/m) Σ_q g_q g_qᵀ)⁻¹`` over its B
coordinates, built either

- by the Woodbury / Sherman–Morrison rank-1 recursion from ``F₀⁻¹ = I/λ`` (Kurtic et al. 2022, §3):
  ``F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (m + gᵀF⁻¹g)``, one batched op over all S blocks per gradient; or
- directly: accumulate ``GᵀG`` per block (one batched matmul per chunk of gradients), then one batched
  Cholesky inverse of ``λI + GᵀG/m``.

Both give the same matrix (up to rounding). Memory is ``S·B²`` numbers (``≈ B·d``); B=1 stores only
the diagonal, ``1/(λ + (1/m)Σ g_i²)``, in O(d) (the diagonal Fisher of OBD).
"""

from __future__ import annotations

import contextlib
import math

import torch

FISHER_FORMS = ("woodbury", "direct")


def num_blocks(numel: int, block_size: int) -> int:
    """``⌈numel / B⌉``."""
    return math.ceil(numel / block_size)


def check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"fisher block_size must be a positive integer, got {block_size!r}")
    return block_size


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flatten ``x`` (e.g. a weight ``[out, in]``, ``d = out·in``) into ``[S, B]`` blocks, zero-padding the tail."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def grads_to_blocks(grads: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[k, d]`` flattened gradients → ``[S, k, B]`` (blocks first, for batched matmuls)."""
    k, d = grads.shape
    pad = num_blocks(d, block_size) * block_size - d
    if pad:
        grads = torch.cat([grads, grads.new_zeros(k, pad)], dim=1)
    return grads.view(k, -1, block_size).transpose(0, 1)


def from_blocks(blocks: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `to_blocks`: ``[S, B]`` → the first ``numel`` entries as a flat vector."""
    return blocks.reshape(-1)[:numel]


def fisher_inverse_bytes(numel: int, block_size: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes taken by one layer's block-diagonal Fisher inverse: ``S·B²`` (``S`` for B=1) elements."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_block = 1 if block_size == 1 else block_size * block_size
    return num_blocks(numel, block_size) * per_block * elem


@contextlib.contextmanager
def batched_lapack_threads(device: torch.device):
    """Run batched small-matrix LAPACK (Cholesky, inverse, solve) with one intra-op thread on CPU.

    Measured on the shared 2-core machine (3000 blocks of 50×50): ``cholesky_inverse`` 0.08 s with
    one thread vs 7–30 s with two (the batch loop and the BLAS threads oversubscribe); matmuls are unaffected.
    """
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


class BlockFisherInverse:
    """Block-diagonal empirical Fisher inverse for ``numel`` weights.

    Args:
        numel: number of weights d (a flattened layer).
        block_size: B (≥ 1). B=1 is the diagonal Fisher (OBD), stored in O(d).
        num_grads: m, the total number of gradients that will be added (the ``1/m`` of the average).
        damp: λ > 0, the dampening added to the Fisher's diagonal.
        form: ``"woodbury"`` (rank-1 updates of the inverse) or ``"direct"`` (accumulate ``GᵀG``, invert once).
        dtype: storage precision of the blocks (float32 default; bfloat16/float16 halve the memory,
            arithmetic is done in float32 chunk by chunk).
        device: where the blocks live.
        chunk_blocks: blocks processed at once when converting to/from float32 or inverting.

    Use: ``add_grads(G)`` for each ``[k, d]`` batch of gradients, then ``finalize()``; afterwards
    ``blocks`` (``[S, B, B]`` or ``[S]`` for B=1) is the inverse and `diag` its diagonal.
    """

    def __init__(
        self,
        numel: int,
        block_size: int = 50,
        num_grads: int = 1024,
        damp: float = 1e-7,
        form: str = "direct",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_blocks: int = 8192,
    ) -> None:
        if form not in FISHER_FORMS:
            raise ValueError(f"unknown Fisher form {form!r}; choose one of {FISHER_FORMS}")
        if not damp > 0:
            raise ValueError(f"damp must be > 0, got {damp!r}")
        if isinstance(num_grads, bool) or not isinstance(num_grads, int) or num_grads < 1:
            raise ValueError(f"num_grads must be a positive integer, got {num_grads!r}")
        self.numel = int(numel)
        self.block_size = check_block_size(block_size)
        self.num_grads = num_grads
        self.damp = float(damp)
        self.form = form
        self.dtype = dtype
        self.device = torch.device(device)
        self.chunk_blocks = chunk_blocks
        self.num_blocks = num_blocks(self.numel, self.block_size)
        self.grads_added = 0
        self.finalized = False
        B, S = self.block_size, self.num_blocks
        if B == 1:
            # Diagonal: woodbury keeps F⁻¹_ii, direct keeps Σ g_i²; both O(d).
            init = 1.0 / self.damp if form == "woodbury" else 0.0
            self.blocks = torch.full((S,), init, dtype=dtype, device=self.device)
        elif form == "woodbury":
            eye = torch.eye(B, dtype=dtype, device=self.device) / self.damp
            self.blocks = eye.expand(S, B, B).clone()
        else:
            self.blocks = torch.zeros(S, B, B, dtype=dtype, device=self.device)  # Σ GᵀG until finalize

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()

    def _chunks(self):
        for start in range(0, self.num_blocks, self.chunk_blocks):
            yield slice(start, min(start + self.chunk_blocks, self.num_blocks))

    @torch.no_grad()
    def add_grads(self, grads: torch.Tensor) -> None:
        """Add ``k`` flattened gradients (``[k, d]`` or ``[d]``) to the estimate."""
        if self.finalized:
            raise RuntimeError("BlockFisherInverse is finalized; create a new one to add gradients")
        grads = grads.reshape(-1, grads.shape[-1]) if grads.dim() > 1 else grads.view(1, -1)
        if grads.shape[1] != self.numel:
            raise ValueError(f"gradient has {grads.shape[1]} entries, Fisher was built for {self.numel}")
        g = grads_to_blocks(grads.to(device=self.device, dtype=torch.float32), self.block_size)  # [S, k, B]
        m = float(self.num_grads)
        if self.block_size == 1:
            g = g[..., 0]  # [S, k]
            if self.form == "direct":
                self.blocks += g.square().sum(1).to(self.dtype)
            else:
                f = self.blocks.float()
                for q in range(g.shape[1]):  # scalar Sherman–Morrison per coordinate
                    f = f - (f * g[:, q]).square() / (m + g[:, q].square() * f)
                self.blocks.copy_(f)
        elif self.form == "direct":
            for sl in self._chunks():
                gb = g[sl]
                self.blocks[sl] += torch.bmm(gb.transpose(1, 2), gb).to(self.dtype)
        else:
            for q in range(g.shape[1]):
                for sl in self._chunks():
                    self._woodbury_rank1(sl, g[sl, q], m)
        self.grads_added += grads.shape[0]

    def _woodbury_rank1(self, sl: slice, g: torch.Tensor, m: float) -> None:
        """``F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (m + gᵀF⁻¹g)`` for the blocks in ``sl`` (batched)."""
        f = self.blocks[sl]
        f32 = f if f.dtype == torch.float32 else f.float()
        fg = torch.bmm(f32, g.unsqueeze(2)).squeeze(2)  # [s, B]
        denom = (m + (g * fg).sum(1)).sqrt().unsqueeze(1)
        fg = fg / denom
        f32 = f32.baddbmm_(fg.unsqueeze(2), fg.unsqueeze(1), alpha=-1) if f32 is f else \
            f32.baddbmm(fg.unsqueeze(2), fg.unsqueeze(1), alpha=-1)
        if f32 is not f:
            f.copy_(f32)

    @torch.no_grad()
    def finalize(self) -> BlockFisherInverse:
        """Turn the accumulated statistics into the inverse (direct form); check the gradient count."""
        if self.finalized:
            return self
        if self.grads_added != self.num_grads:
            raise ValueError(
                f"Fisher expected num_grads={self.num_grads} gradients, got {self.grads_added}"
            )
        if self.form == "direct":
            m, lam = float(self.num_grads), self.damp
            if self.block_size == 1:
                self.blocks.copy_(1.0 / (lam + self.blocks.float() / m))
            else:
                eye = torch.eye(self.block_size, device=self.device)
                with batched_lapack_threads(self.device):
                    self._invert_chunks(eye, m, lam)
        self.finalized = True
        return self

    def _invert_chunks(self, eye: torch.Tensor, m: float, lam: float) -> None:
        for sl in self._chunks():
            fisher = self.blocks[sl].float() / m + lam * eye
            chol, info = torch.linalg.cholesky_ex(fisher)
            if bool((info != 0).any()):  # float32 too coarse for λ ≪ ‖g‖²: redo this chunk in float64
                chol, info = torch.linalg.cholesky_ex(fisher.double())
                if bool((info != 0).any()):
                    raise RuntimeError(f"Fisher block not positive definite (damp={lam}); increase damp")
            self.blocks[sl] = torch.cholesky_inverse(chol).to(self.dtype)

    def all_reduce_(self) -> None:
        """Sum the direct form's ``GᵀG`` over torch.distributed ranks (before `finalize`)."""
        import torch.distributed as dist

        if self.form != "direct" or self.finalized:
            raise RuntimeError("all_reduce_ combines the direct form's Σ GᵀG before finalize only")
        dist.all_reduce(self.blocks)
        self.grads_added = self.num_grads

    def diag(self) -> torch.Tensor:
        """``[F⁻¹]_ii`` for the d weights (float32)."""
        self._check_final()
        if self.block_size == 1:
            return self.blocks.float()[: self.numel]
        return self.blocks.diagonal(dim1=1, dim2=2).float().reshape(-1)[: self.numel]

    def matrix_blocks(self, sl: slice | None = None) -> torch.Tensor:
        """float32 ``[s, B, B]`` blocks of F⁻¹ (B=1: ``[s, 1, 1]``)."""
        self._check_final()
        sl = sl or slice(0, self.num_blocks)
        b = self.blocks[sl].float()
        return b.view(-1, 1, 1) if self.block_size == 1 else b

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        """``F⁻¹ v`` for a length-d vector (any shape with d elements); returns a flat float32 vector."""
        self._check_final()
        vb = to_blocks(v.to(device=self.device, dtype=torch.float32), self.block_size)
        if self.block_size == 1:
            return from_blocks(self.blocks.float().unsqueeze(1) * vb, self.numel)
        out = torch.empty_like(vb)
        for sl in self._chunks():
            out[sl] = torch.bmm(self.blocks[sl].float(), vb[sl].unsqueeze(2)).squeeze(2)
        return from_blocks(out, self.numel)

    def _check_final(self) -> None:
        if not self.finalized:
            raise RuntimeError("call finalize() before using the Fisher inverse")
