"""Compressed encodings of pruned weights: packed bitmasks, N:M values + in-group indices, symmetric INT8.

- Bitmask (the "bitmap" sparse format, e.g. Han et al. 2016 §3 store positions; here 1 bit per weight): a weight
  matrix with ``nnz`` non-zeros costs ``ceil(numel/8)`` bytes of mask plus ``nnz`` values.
- N:M (Mishra et al. 2021, NVIDIA's 2:4 metadata): every group of M consecutive inputs keeps exactly N values and
  their positions in the group, ``ceil(log2 M)`` bits each (2 bits for 2:4); a group with fewer than N non-zeros
  stores zeros as filler.
- INT8, per output channel, symmetric (Jacob et al. 2018, eq. 1 with zero-point 0): ``s_i = max_j |W_ij| / 127``,
  ``q = round(W / s)``, ``Ŵ = s·q``; so ``|Ŵ - W| ≤ s/2`` and a zero stays exactly zero.

All packing is vectorised (numpy ``packbits`` over whole tensors), with no Python loop over weights.
"""

from __future__ import annotations

import math

import numpy as np
import torch

INT8_MAX = 127


def canonical_zeros(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with every ``-0.0`` turned into ``+0.0`` (``x + 0.0``, exact for every other value), so that the
    zeros of a masked weight (``W ⊙ M`` gives ``-0.0`` where ``W < 0``) have a single bit pattern."""
    return weight + 0.0 if weight.is_floating_point() else weight


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8 bytes, little bit order (bit ``k`` of byte ``j`` is element ``8j + k``)."""
    packed = np.packbits(bits.reshape(-1).cpu().numpy().astype(np.uint8), bitorder="little")
    return torch.from_numpy(packed)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first ``count`` bits as a flat bool tensor.

    Raises:
        ValueError: ``packed`` does not hold exactly ``ceil(count / 8)`` bytes.
    """
    if packed.dtype != torch.uint8 or packed.numel() != math.ceil(count / 8):
        raise ValueError(f"bit array of {count} bits needs {math.ceil(count / 8)} uint8 bytes, got "
                         f"{packed.numel()} {packed.dtype}")
    bits = np.unpackbits(packed.numpy(), count=count, bitorder="little")
    return torch.from_numpy(bits.astype(bool))


def bitmask_encode(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed mask, non-zero values in row-major order)`` of a weight tensor."""
    mask = weight != 0
    return pack_bits(mask), weight[mask]


def bitmask_decode(packed: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild the dense tensor of ``shape`` (zeros where the mask bit is 0).

    Raises:
        ValueError: the mask's number of set bits is not the number of values (a corrupt file).
    """
    mask = unpack_bits(packed, math.prod(shape))
    nnz = int(mask.sum())
    if nnz != values.numel():
        raise ValueError(f"bitmask has {nnz} set bits but {values.numel()} values are stored")
    dense = torch.zeros(math.prod(shape), dtype=values.dtype)
    dense[mask] = values
    return dense.reshape(shape)


def index_bits(m: int) -> int:
    """Bits per in-group index of an N:M pattern: ``ceil(log2 M)`` (at least 1)."""
    return max(1, math.ceil(math.log2(m)))


def nm_encode(weight: torch.Tensor, n: int, m: int, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [out, in/M·N], packed indices)`` of an N:M-sparse ``[out, in]`` weight: per group of M inputs the
    N kept positions in ascending order (non-zeros first picked, zeros as filler), each in `index_bits` bits.

    Raises:
        ValueError: M is not in [2, 16], N not in [1, M), ``in`` is not divisible by M, or a group holds more than
            N non-zeros (the layer is not N:M); the message names the layer.
    """
    if not (2 <= m <= 16 and 1 <= n < m):
        raise ValueError(f"N:M pattern {n}:{m} not supported: need 2 ≤ M ≤ 16 and 1 ≤ N < M")
    if weight.dim() != 2 or weight.shape[1] % m:
        raise ValueError(f"{name}: shape {tuple(weight.shape)} has no input dimension divisible by M={m}")
    out_f, in_f = weight.shape
    groups = weight.reshape(out_f, in_f // m, m)
    nonzero = groups != 0
    worst = int(nonzero.sum(-1).max())
    if worst > n:
        raise ValueError(f"{name} is not {n}:{m} sparse: a group of {m} inputs holds {worst} non-zeros")
    # stable sort puts the non-zeros first (in position order), then the zero positions as filler
    order = torch.sort((~nonzero).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    index = torch.sort(order, dim=-1).values
    values = torch.gather(groups, -1, index).reshape(out_f, -1)
    bits = (index.reshape(-1, 1) >> torch.arange(index_bits(m))) & 1
    return values, pack_bits(bits.bool())


def nm_decode(values: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """Rebuild the dense ``[out, in]`` tensor from `nm_encode`'s values and packed indices.

    Raises:
        ValueError: sizes that do not fit ``shape`` and N:M, or indices out of the group or repeated (corrupt).
    """
    out_f, in_f = shape
    n_groups = out_f * (in_f // m)
    if in_f % m or values.shape != (out_f, in_f // m * n):
        raise ValueError(f"N:M values of shape {tuple(values.shape)} do not fit {n}:{m} weights of shape {shape}")
    width = index_bits(m)
    bits = unpack_bits(packed, n_groups * n * width).reshape(-1, width).to(torch.int64)
    index = (bits << torch.arange(width)).sum(-1).reshape(out_f, in_f // m, n)
    if (index.numel() and int(index.max()) >= m) or bool((index[..., 1:] <= index[..., :-1]).any()):
        raise ValueError(f"N:M indices out of range or not increasing within a group of {m}: corrupt data")
    dense = torch.zeros(out_f, in_f // m, m, dtype=values.dtype)
    dense.scatter_(-1, index, values.reshape(out_f, in_f // m, n))
    return dense.reshape(shape)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (output channel / embedding row) symmetric INT8: ``(q int8, scale float32 [rows])`` with
    ``s = max|W_row| / 127`` (1 for an all-zero row), ``q = round(W / s)`` clamped to ±127.

    Raises:
        ValueError: non-finite weights.
    """
    w = weight.detach().float().reshape(weight.shape[0], -1)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize non-finite weights to INT8")
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``s_row · q`` in ``dtype`` (zeros stay exactly zero)."""
    if scale.dim() != 1 or scale.numel() != q.shape[0]:
        raise ValueError(f"INT8 scales of shape {tuple(scale.shape)} do not fit weights of shape {tuple(q.shape)}")
    shape = (-1,) + (1,) * (q.dim() - 1)
    return (q.float() * scale.float().reshape(shape)).to(dtype)


INT4_MAX = 7


def quantize_int4(weight: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 in groups of ``group`` consecutive values of a row: ``s = max|W_g| / 7`` (fp16, at least
    2⁻¹⁴), ``q = round(W / s)`` in [-7, 7], two values per byte (``q + 8``, low nibble first). Returns
    ``(packed uint8 [rows, cols/2], scales fp16 [rows, cols/group])``; ``|Ŵ − W| ≤ s/2`` and zeros stay zero.

    Raises:
        ValueError: ``cols`` not divisible by an even ``group``, or non-finite weights.
    """
    rows, cols = weight.shape
    if group % 2 or cols % group:
        raise ValueError(f"INT4 groups of {group} do not tile rows of {cols} values (need an even divisor)")
    w = weight.detach().float().reshape(rows, cols // group, group)
    if not torch.isfinite(w).all():
        raise ValueError("cannot quantize non-finite weights to INT4")
    amax = w.abs().amax(-1)
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).clamp(min=2**-14).half()
    q = torch.round(w / scale.float()[..., None]).clamp_(-INT4_MAX, INT4_MAX).to(torch.int16).reshape(rows, cols)
    u = (q + 8).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Float32 ``[rows, cols]`` from `quantize_int4`'s packed nibbles and fp16 group scales.

    Raises:
        ValueError: shapes that do not fit each other (a corrupt file).
    """
    rows, half = packed.shape
    if packed.dtype != torch.uint8 or scale.shape != (rows, 2 * half // group) or (2 * half) % group:
        raise ValueError(f"INT4 data {tuple(packed.shape)} and scales {tuple(scale.shape)} do not fit groups of "
                         f"{group}")
    q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(rows, 2 * half).to(torch.int16) - 8
    return (q.float().reshape(rows, -1, group) * scale.float()[..., None]).reshape(rows, 2 * half)
