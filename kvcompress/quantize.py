"""Group-wise integer quantization of stored cache tensors (int8, or int4 packed two per byte).

Each group of `group_size` consecutive numbers along the last dimension shares one float16 scale
(its largest magnitude over the largest integer: symmetric, no zero point). A tensor
``[B, H, n, D]`` becomes ``{"q": [B, H, n, D * bits / 8] int8/uint8, "scale": [B, H, n, groups] float16}``:
both keep the slot dimension at 2, so the cache core can gather, pack and batch them like any
store tensor. The last dimension is zero-padded to whole groups; `dequantize` cuts the padding off.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .policies import Encoding, LayerView

BITS = (4, 8)


def check_quantization(bits: int | None, group_size: int) -> None:
    if bits is not None and bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))} (or None for no quantization), got {bits!r}.")
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2 (numbers sharing one scale), got {group_size!r}.")


def quantize(x: torch.Tensor, bits: int, group_size: int) -> dict:
    """`x` ``[..., D]`` -> ``{"q", "scale"}``, `group_size` numbers per float16 scale."""
    width = x.shape[-1]
    padded = math.ceil(width / group_size) * group_size
    groups = torch.nn.functional.pad(x.float(), (0, padded - width)).unflatten(-1, (padded // group_size, group_size))
    largest = 2 ** (bits - 1) - 1
    scale = (groups.abs().amax(-1, keepdim=True) / largest).to(torch.float16)
    safe = scale.float().masked_fill(scale == 0, 1.0)
    q = (groups / safe).round().clamp(-largest, largest).flatten(-2).to(torch.int8)
    if bits == 4:  # two numbers a byte: low nibble, high nibble (offset to 0..15)
        nibbles = (q + 8).to(torch.uint8)
        q = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return {"q": q, "scale": scale[..., 0]}


def dequantize(packed: dict, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: ``[..., width]`` in `dtype`."""
    q, scale = packed["q"], packed["scale"]
    if q.dtype == torch.uint8:
        q = torch.stack([(q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8], dim=-1).flatten(-2)
    groups = q.unflatten(-1, (scale.shape[-1], -1)).to(dtype) * scale[..., None].to(dtype)
    return groups.flatten(-2)[..., :width]


@dataclass
class Quantized:
    """A tensor of `width` numbers per row as `quantize` left it, for readers that de-quantize it themselves."""

    q: torch.Tensor
    scale: torch.Tensor
    width: int

    @property
    def shape(self) -> torch.Size:
        """The shape of the tensor it stands for."""
        return self.q.shape[:-1] + (self.width,)

    @property
    def bits(self) -> int:
        return 4 if self.q.dtype == torch.uint8 else 8

    @property
    def group_size(self) -> int:
        return self.q.shape[-1] * 8 // self.bits // self.scale.shape[-1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize({"q": self.q, "scale": self.scale}, self.width, dtype)


SLOT_METADATA = ("token_ids", "scores", "bias")  # per-slot bookkeeping that stays as it is


class QuantizedEncoding(Encoding):
    """Another encoding's numbers (plain keys and values by default, or low-rank latents) held as int8 or int4 with a float16
    scale per `group_size` numbers; they are de-quantized while a layer's attention runs (on chip in the latent kernel)."""

    plain = False

    def __init__(self, bits: int = 8, group_size: int = 32, inner: Encoding | None = None):
        if bits is None:
            raise ValueError("QuantizedEncoding needs bits (4 or 8).")
        check_quantization(bits, group_size)
        self.bits, self.group_size, self.inner = bits, group_size, inner or Encoding()
        self.attends_store, self.uses_bias, self.artifacts = self.inner.attends_store, self.inner.uses_bias, self.inner.artifacts
        self.layer_widths: dict[int, dict[str, int]] = {}  # per layer: the width of each quantized tensor before padding

    def for_heads(self, heads: range) -> QuantizedEncoding:
        served = copy.copy(self)  # a subclass stays itself
        served.inner, served.layer_widths = self.inner.for_heads(heads), {}
        served.artifacts = served.inner.artifacts
        return served

    def widths(self, layer_idx: int, head_dim: int) -> list[tuple[int, int]]:
        return self.inner.widths(layer_idx, head_dim)

    def slot_bytes(self, layer_idx: int, head_dim: int, dtype_bytes: int) -> float:
        groups = [(math.ceil(width / self.group_size), heads) for width, heads in self.widths(layer_idx, head_dim)]
        return sum(count * (self.group_size * self.bits / 8 + 2) / heads for count, heads in groups)  # padded groups, a float16 scale each

    def encode(self, layer: LayerView, slots: dict) -> dict:
        tensors = self.inner.encode(layer, slots)
        numbers = {name: tensor for name, tensor in tensors.items() if name not in SLOT_METADATA and tensor is not None}
        self.layer_widths[layer.layer_idx] = {name: tensor.shape[-1] for name, tensor in numbers.items()}
        packed = {f"{name}.{part}": value for name, tensor in numbers.items() for part, value in quantize(tensor, self.bits, self.group_size).items()}
        return {name: tensors.get(name) for name in SLOT_METADATA if name in tensors} | packed

    def quantized(self, layer: LayerView, store: dict) -> dict:
        """The store with its numbers as `Quantized` tensors (for an inner `attend` that reads them as they are)."""
        widths = self.layer_widths[layer.layer_idx]
        return {name: store[name] for name in SLOT_METADATA if name in store} | {
            name: Quantized(store[f"{name}.q"], store[f"{name}.scale"], width) for name, width in widths.items()
        }

    def decode(self, layer: LayerView, store: dict) -> tuple[torch.Tensor, torch.Tensor]:
        store = {name: t.dequantize(layer.dtype) if isinstance(t, Quantized) else t for name, t in self.quantized(layer, store).items()}
        return self.inner.decode(layer, store)

    def attend(self, layer: LayerView, store: dict, queries: torch.Tensor, scaling: float):
        return self.inner.attend(layer, self.quantized(layer, store), queries, scaling)
