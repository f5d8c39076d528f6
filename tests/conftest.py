"""Shared fixtures: a tiny BERT and tokenizer written to disk, so no test needs a network or the packaged model."""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

WORDS = (
    "account bank card credit debt loan mortgage payment report score student transfer "
    "fee fraud charge interest late collection dispute error closed open money wire "
    "the a my i was is not and to of for on in with they me"
).split()


def write_tiny_model(path, dropout=0.1):
    """Write a 2-layer, 32-wide BERT and a word-level BERT tokenizer into `path`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt"), do_lower_case=True).save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A directory with a tiny BERT checkpoint and its tokenizer."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_model_dir_no_dropout(tmp_path_factory):
    """The tiny BERT without dropout, for tests that compare two training runs step by step."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)
