"""A pruned state dict stored by its nonzeros: each mostly-zero tensor becomes its nonzero values
(in order) plus a bitmask of where they go, one bit per element.

Why a bitmask and not a list of indices: an int32 index per nonzero costs as much as the fp32
value it locates, so 50 % sparsity would save nothing; one bit per element costs 1/32 of the
dense fp32 tensor, and the file shrinks with the sparsity (50 % → 53 % of dense, 70 % → 33 %).
Values come back bit for bit, so the reloaded model computes what the pruned one did.
"""

from __future__ import annotations

from typing import Any

import torch

VALUES, MASK = "#values", "#mask"  # suffixes of the two stored tensors ('#' is in no module name)
MIN_ELEMENTS = 256  # smaller tensors (biases, scales) stay dense: a manifest entry each otherwise
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """Booleans → uint8, eight per byte, first flag in the high bit (numpy's ``packbits``)."""
    pad = (-flags.numel()) % 8
    bits = torch.cat([flags.flatten(), flags.new_zeros(pad)]).view(-1, 8).to(torch.uint8)
    return (bits * _BITS).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` flags."""
    return ((packed.view(-1, 1) & _BITS) != 0).flatten()[:n]


def encode(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stored tensors and the manifest entry (``{name: {shape, dtype}}``) of the encoded ones.
    A tensor is encoded only where that is smaller than storing it dense: fp32 with more than
    1/32 zeros, int8 (a pruned model's quantized weights) with more than 1/8."""
    stored: dict[str, torch.Tensor] = {}
    sparse: dict[str, Any] = {}
    for name, t in tensors.items():
        flat = t.detach().flatten()
        nonzero = flat != 0
        count = int(nonzero.sum())
        encoded = count * t.element_size() + (flat.numel() + 7) // 8
        if flat.numel() < MIN_ELEMENTS or t.dtype == torch.bool \
                or encoded >= flat.numel() * t.element_size():
            stored[name] = t
            continue
        stored[name + VALUES] = flat[nonzero].contiguous()
        stored[name + MASK] = pack_bits(nonzero)
        sparse[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    return stored, sparse


def decode(stored: dict[str, torch.Tensor], sparse: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense state dict back from :func:`encode`'s output."""
    out = {k: v for k, v in stored.items() if not k.endswith((VALUES, MASK))}
    for name, spec in sparse.items():
        values = stored[name + VALUES]
        shape = [int(s) for s in spec["shape"]]
        n = 1
        for s in shape:
            n *= s
        where = unpack_bits(stored[name + MASK], n)
        if int(where.sum()) != values.numel():
            raise ValueError(f"{name}: the bitmask marks {int(where.sum())} nonzeros but "
                             f"{values.numel()} values are stored")
        dense = values.new_zeros(n)
        dense[where] = values
        out[name] = dense.view(shape)
    return out
