"""The one local training loop (DP-SGD or plain) and prediction, shared by sites, the server and the benchmarks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from common import privacy

BETAS = (0.9, 0.999)
# At most this many examples go through the model at once; a larger Poisson batch is processed in parts that
# Opacus accumulates into one step. Memory stays bounded whatever batch size the server asks for.
MAX_PHYSICAL_BATCH = 128



@dataclass(frozen=True)
class TensorData:
    """Tokenized examples ready for the model; `labels` is one index per example, or per token (-100: none)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> TensorData:
        index = torch.as_tensor(index, dtype=torch.long)
        return TensorData(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The model's inputs, then the labels."""
        return self.input_ids, self.attention_mask, self.labels


@dataclass(frozen=True)
class FeatureData:
    """What the frozen encoder made of each example (its features for the head), and the labels."""

    features: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.features, self.labels


@dataclass(frozen=True)
class DPSettings:
    """One round's DP-SGD: noise and sample rate come from the site's calibration and its public example count."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float


@dataclass(frozen=True)
class TrainResult:
    """`loss` is the unclipped mean training loss: it stays in the site's own log. `ran` is what Opacus ran."""

    loss: float
    steps: int
    ran: list[privacy.Entry] | None


def train_round(
    model: nn.Module,
    data: TensorData | FeatureData,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    learning_rate: float,
    dp: DPSettings | None,
    device: torch.device | str = "cpu",
    progress: str | None = None,
    proximal_mu: float = 0.0,
    decay: tuple[float, float] = (1.0, 1.0),
) -> TrainResult:
    """Train the model's trainable parameters in place for `epochs` passes over `data`.

    With `dp`, Opacus samples each batch by Poisson sampling and clips and noises per-example
    gradients, its randomness drawn from the operating system's entropy. An empty batch takes a
    noise-only step and a large one goes through the model in parts of `MAX_PHYSICAL_BATCH`: either
    way the step is the one the ledger accounts, and no data, even none, stops the round. With `proximal_mu` > 0
    (FedProx), every step also pulls the weights toward those the round started from. The learning
    rate moves linearly from ``decay[0]`` to ``decay[1]`` times `learning_rate` over the round.
    """
    dataset = TensorDataset(*data.tensors())
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=BETAS, weight_decay=0.0)
    model.train()
    private = None
    if dp is None:
        runner, loader = model, DataLoader(dataset, batch_size=batch_size, shuffle=len(dataset) > 0)
    else:
        private = privacy.make_private(
            model, optimizer, dataset, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            sample_rate=dp.sample_rate, batch_size=batch_size, device=device,
        )
        runner, optimizer, loader = private.module, private.optimizer, private.loader
    try:
        losses: list[float] = []
        # A bar only on a terminal: in logs and Ray workers it would be hundreds of lines.
        bar = tqdm(total=epochs * len(loader), desc=progress, leave=False,
                   disable=progress is None or not sys.stderr.isatty())
        total, step = epochs * len(loader), 0
        for _ in range(epochs):
            for *inputs, labels in loader:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate * (decay[0] + (decay[1] - decay[0]) * step / total)
                step += 1
                if private is None:
                    losses.append(_step(runner, optimizer, loss_fn, inputs, labels, device))
                elif not len(labels):
                    optimizer.noise_step()
                else:
                    parts = range(0, len(labels), MAX_PHYSICAL_BATCH)
                    for start in parts:
                        # Opacus clips and sums each part's per-example gradients; the last one takes the step.
                        optimizer.signal_skip_step(do_skip=start != parts[-1])
                        part = slice(start, start + MAX_PHYSICAL_BATCH)
                        losses.append(_step(runner, optimizer, loss_fn, [x[part] for x in inputs], labels[part],
                                            device))
                if anchor is not None:
                    _proximal_step(params, anchor, learning_rate * proximal_mu)
                bar.update(1)
        bar.close()
    finally:
        if private is not None:
            private.close()
    model.eval()
    return TrainResult(
        loss=float(np.mean(losses)) if losses else float("nan"),
        steps=step,
        ran=None if private is None else private.ran(),
    )


def _step(runner: nn.Module, optimizer, loss_fn, inputs, labels: torch.Tensor, device) -> float:
    """Forward and backward one batch and step the optimizer; the (unclipped) loss, for the site's own log."""
    loss = loss_fn(runner(*(x.to(device) for x in inputs)), labels.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def _proximal_step(params: list[nn.Parameter], anchor: list[torch.Tensor], rate: float) -> None:
    """FedProx's pull w <- w - rate·(w - w_global), applied after the optimizer step.

    Opacus computes per-example gradients from the data loss only, so a proximal term added to
    the loss would be silently dropped; this data-independent step is post-processing and costs no ε.
    """
    for param, start in zip(params, anchor):
        param.sub_(param - start, alpha=rate)


@torch.no_grad()
def features(model: nn.Module, data: TensorData, *, batch_size: int = 128, device="cpu") -> FeatureData:
    """Each example's features for the head, from the model's (frozen) encoder in evaluation mode, on the CPU."""
    model.eval()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not len(data):
        # No records (a label set can leave none): the features' shape comes from a public all-padding input.
        blank = torch.zeros((1, *data.input_ids.shape[1:]), dtype=data.input_ids.dtype, device=device)
        return FeatureData(inner.features(blank, torch.ones_like(blank)).cpu()[:0], data.labels)
    chunks = [inner.features(data.input_ids[start:start + batch_size].to(device),
                             data.attention_mask[start:start + batch_size].to(device)).cpu()
              for start in range(0, len(data), batch_size)]
    return FeatureData(torch.cat(chunks), data.labels)


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, *, batch_size: int = 128, device="cpu") -> torch.Tensor:
    """The predicted label index of every example (or of every token), on the CPU."""
    model.eval()
    predictions = [
        model(data.input_ids[start:start + batch_size].to(device),
              data.attention_mask[start:start + batch_size].to(device)).argmax(dim=-1).cpu()
        for start in range(0, len(data), batch_size)
    ]
    return torch.cat(predictions) if predictions else torch.zeros(data.labels.shape, dtype=torch.long)
