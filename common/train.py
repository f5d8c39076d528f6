"""The one local training loop (DP-SGD or plain) and evaluation, shared by sites, the server and the benchmarks."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common import privacy


@dataclass(frozen=True)
class TensorData:
    """Tokenized examples ready for the model."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> TensorData:
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorData(self.input_ids[index], self.attention_mask[index], self.labels[index])


@dataclass(frozen=True)
class DPSettings:
    """How one round's DP-SGD is run; the noise multiplier comes from the site's calibration."""

    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    examples: int


def train_round(
    model: nn.Module,
    data: TensorData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    dp: DPSettings | None,
    seed: int,
    device: torch.device | str = "cpu",
    expected_steps: int | None = None,
    progress: str | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the model's trainable parameters in place for `epochs` passes over `data`.

    With `dp`, Opacus samples each batch by Poisson sampling and clips and noises per-example
    gradients; `expected_steps` (the steps the ledger already recorded) must match what Opacus runs.
    With `proximal_mu` > 0 (FedProx), every step also pulls the weights toward those the round started from.
    """
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(data.input_ids, data.attention_mask, data.labels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    model.train()
    runner = model
    if dp is not None:
        runner, optimizer, loader = privacy.make_private(
            model, optimizer, loader, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm
        )
    try:
        total_steps = epochs * len(loader)
        if expected_steps is not None and total_steps != expected_steps:
            raise privacy.PrivacyError(
                f"Opacus would run {total_steps} steps but the ledger recorded {expected_steps}; refusing to train"
            )
        criterion = nn.CrossEntropyLoss()
        losses: list[float] = []
        # A bar only on a terminal: in logs and Ray workers it would be hundreds of lines.
        bar = tqdm(total=total_steps, desc=progress, disable=progress is None or not sys.stderr.isatty(), leave=False)
        for _ in range(epochs):
            for input_ids, attention_mask, labels in loader:
                logits = runner(input_ids.to(device), attention_mask.to(device))
                loss = criterion(logits, labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if anchor is not None:
                    _proximal_step(params, anchor, learning_rate * proximal_mu)
                losses.append(loss.item())
                bar.update(1)
        bar.close()
    finally:
        if dp is not None:
            privacy.release(runner)
    model.eval()
    return TrainResult(loss=float(np.mean(losses)) if losses else float("nan"), steps=len(losses), examples=len(data))


@torch.no_grad()
def _proximal_step(params: list[nn.Parameter], anchor: list[torch.Tensor], rate: float) -> None:
    """FedProx's pull w <- w - rate·(w - w_global), applied after the optimizer step.

    Opacus computes per-example gradients from the data loss only, so a proximal term added to
    the loss would be silently dropped; this data-independent step is post-processing and costs no ε.
    """
    for param, start in zip(params, anchor):
        param.sub_(param - start, alpha=rate)


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, *, batch_size: int = 128, device="cpu") -> tuple[float, np.ndarray]:
    """Mean cross-entropy loss and the predicted class of every example."""
    model.eval()
    losses, predictions = [], []
    for start in range(0, len(data), batch_size):
        chunk = slice(start, start + batch_size)
        logits = model(data.input_ids[chunk].to(device), data.attention_mask[chunk].to(device))
        labels = data.labels[chunk].to(device)
        losses.append(nn.functional.cross_entropy(logits, labels, reduction="sum").item())
        predictions.append(logits.argmax(dim=-1).cpu().numpy())
    loss = sum(losses) / max(len(data), 1)
    return loss, np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
