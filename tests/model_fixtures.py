"""Adapter directories as a run's final/ holds them, built from the tiny model without a federation, and small data files."""

import json
import random

import torch

from common.model import build_model, weights_sha256
from common.task import TASKS

SEQUENCE_LABELS = ["card", "loan", "mortgage"]
TAGS = ["O", "B-BANK", "I-BANK", "B-MONEY", "I-MONEY"]


def write_adapter(model_dir, out, task="sequence-classification", labels=SEQUENCE_LABELS, *, max_length=16, seed=7):
    """Save a LoRA adapter with random (non-zero) B matrices and a random head, plus its privet.json, into `out`.

    Non-zero B makes the merged model differ from the base, so a test sees whether the adapter was applied.
    """
    head = TASKS[task].head
    model = build_model(str(model_dir), len(labels), lora_r=4, lora_alpha=8, ffa=True, seed=seed, head=head)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    info = {"task": task, "labels": list(labels), "model": str(model_dir), "max_length": max_length, "seed": seed,
            "model_sha256": weights_sha256(str(model_dir)), "head": head.__name__}
    (out / "privet.json").write_text(json.dumps(info))
    return out


WORDS = {"card": "card fee charge fraud", "loan": "loan student debt interest", "mortgage": "mortgage payment late"}


def write_labelled_csv(path, n=120, seed=0):
    """A CSV of short bank-complaint-like texts (column text) and their product (column product)."""
    rng = random.Random(seed)
    rows = ["text,product"]
    for _ in range(n):
        label = rng.choice(SEQUENCE_LABELS)
        words = WORDS[label].split() + "the my bank account was not".split()
        rows.append(" ".join(rng.choice(words) for _ in range(8)) + f",{label}")
    path.write_text("\n".join(rows) + "\n")
    return path
