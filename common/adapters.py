"""What goes on the wire: exactly the adapter's trainable tensors, as an fp32 Flower ``ArrayRecord``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

WIRE_DTYPE = np.dtype("float32")


class UpdateError(ValueError):
    """An adapter update does not match what this model expects."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train and travel (LoRA B, LoRA A unless frozen, the head), detached fp32 CPU copies."""
    return {
        name: param.detach().to("cpu", torch.float32).clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def expected_spec(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor an update for this model must carry, and nothing else."""
    return {name: tuple(param.shape) for name, param in model.named_parameters() if param.requires_grad}


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack tensors into an ``ArrayRecord`` in fp32 (``ArrayRecord`` rejects bf16)."""
    return ArrayRecord({k: v.detach().to("cpu", torch.float32) for k, v in state.items()})


def check_record(record: ArrayRecord, spec: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ``UpdateError`` unless `record` has exactly `spec`'s keys, shapes, fp32 dtype and finite values."""
    missing = sorted(set(spec) - set(record))
    extra = sorted(set(record) - set(spec))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} unexpected key(s), first {extra[0]!r}")
        raise UpdateError("adapter keys do not match: " + "; ".join(parts))
    for key, shape in spec.items():
        array = record[key]
        if tuple(array.shape) != tuple(shape):
            raise UpdateError(f"{key!r} has shape {tuple(array.shape)}, expected {tuple(shape)}")
        if np.dtype(array.dtype) != WIRE_DTYPE:
            raise UpdateError(f"{key!r} has dtype {array.dtype}, expected {WIRE_DTYPE}")
        if not np.all(np.isfinite(array.numpy())):
            raise UpdateError(f"{key!r} holds NaN or infinite values")


def from_record(record: ArrayRecord, spec: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Check `record` against `spec` and unpack it into fp32 tensors."""
    check_record(record, spec)
    return {key: torch.from_numpy(record[key].numpy().copy()) for key in spec}


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters in place (keeping their device and dtype)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))


def encoder_fingerprint(model: nn.Module) -> str:
    """A short hash of every LoRA matrix: equal fingerprints mean the encoder computes the same features."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if ".lora_" in name:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]


def frozen_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen LoRA A matrices, so FFA-LoRA sites can prove they share the server's A."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if ".lora_A." in name and not param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().to("cpu", torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]
