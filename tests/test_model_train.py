"""Model construction, the wire format, and the training loop on a tiny BERT."""

import pytest
import torch
from peft import PeftModel

from common import adapters
from common.model import build_base_model, build_model
from common.task import TASKS
from common.train import DPSettings, TensorData, predict, train_round

NUM_LABELS = 3


def make_data(n=48, length=12, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (n, length), generator=generator)
    input_ids[:, 0] = 2
    labels = torch.randint(0, NUM_LABELS, (n,), generator=generator)
    input_ids[:, 1] = 10 + labels  # a learnable signal
    return TensorData(input_ids, torch.ones_like(input_ids), labels)


def fit(model, data, **kwargs):
    """One local round with the sequence-classification loss."""
    return train_round(model, data, loss_fn=torch.nn.functional.cross_entropy, **kwargs)


def tiny(model_dir, ffa=False, seed=0):
    return build_model(str(model_dir), NUM_LABELS, lora_r=4, lora_alpha=8, ffa=ffa, seed=seed)


def test_only_lora_and_head_train(tiny_model_dir):
    model = tiny(tiny_model_dir)
    names = set(adapters.expected_spec(model))
    assert names and all(".lora_A." in n or ".lora_B." in n or "classifier" in n for n in names)
    assert any("classifier" in n for n in names)
    ffa = tiny(tiny_model_dir, ffa=True)
    assert not any(".lora_A." in n for n in adapters.expected_spec(ffa))


def test_sites_built_from_the_same_seed_share_frozen_a(tiny_model_dir):
    a, b = tiny(tiny_model_dir, ffa=True), tiny(tiny_model_dir, ffa=True)
    assert adapters.frozen_fingerprint(a) == adapters.frozen_fingerprint(b)
    assert adapters.frozen_fingerprint(a) != adapters.frozen_fingerprint(tiny(tiny_model_dir, ffa=True, seed=1))


def test_adapter_round_trip_is_exact(tiny_model_dir):
    model = tiny(tiny_model_dir)
    fit(model, make_data(), epochs=1, batch_size=16, learning_rate=0.01, dp=None)
    state = adapters.trainable_state(model)
    record = adapters.to_record(state)
    other = tiny(tiny_model_dir)
    adapters.load_state(other, adapters.from_record(record, adapters.expected_spec(other)))
    for key, value in adapters.trainable_state(other).items():
        assert torch.equal(value, state[key]), key
    assert all(record[k].dtype == "float32" for k in record)


def test_bf16_tensors_travel_as_fp32(tiny_model_dir):
    state = {k: v.to(torch.bfloat16) for k, v in adapters.trainable_state(tiny(tiny_model_dir)).items()}
    record = adapters.to_record(state)
    adapters.check_record(record, {k: tuple(v.shape) for k, v in state.items()})


@pytest.mark.parametrize("mutate,needle", [
    (lambda s: s.pop(next(iter(s))), "missing"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected"),
    (lambda s: s.update({next(iter(s)): torch.zeros(3, 3)}), "shape"),
    (lambda s: next(iter(s.values())).view(-1).__setitem__(0, float("nan")), "NaN"),
])
def test_check_record_rejects_bad_updates(tiny_model_dir, mutate, needle):
    model = tiny(tiny_model_dir)
    state = adapters.trainable_state(model)
    mutate(state)
    with pytest.raises(adapters.UpdateError, match=needle):
        adapters.check_record(adapters.to_record(state), adapters.expected_spec(model))


def test_lora_weights_change_under_dp_training(tiny_model_dir):
    """Guards against Opacus + PEFT silently leaving LoRA weights untouched (opacus issue 820)."""
    model = tiny(tiny_model_dir)
    before = adapters.trainable_state(model)
    fit(model, make_data(), epochs=1, batch_size=16, learning_rate=0.01,
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=16 / 48))
    after = adapters.trainable_state(model)
    for kind in (".lora_A.", ".lora_B.", "classifier"):
        assert any(not torch.equal(before[k], after[k]) for k in before if kind in k), kind
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0, "Opacus' hooks must be removed after the round"


def make_token_data(n=32, length=12, vocab=40, seed=0):
    """Sentences whose every other position is labelled (the rest stand for later sub-words: -100)."""
    data = make_data(n=n, length=length, vocab=vocab, seed=seed)
    labels = (data.input_ids % NUM_LABELS).clone()
    labels[:, 1::2] = -100
    labels[:, 0] = -100  # [CLS]
    return TensorData(data.input_ids, data.attention_mask, labels)


@pytest.mark.parametrize("task_name", list(TASKS))
def test_dp_without_noise_or_clipping_equals_plain_training(tiny_model_dir_no_dropout, task_name):
    """With σ=0, an unreachable clip bound and a full-batch Poisson rate of 1, DP-SGD is plain training."""
    task = TASKS[task_name]
    data = make_data(n=32) if task_name == "sequence-classification" else make_token_data()

    def model():
        return build_model(str(tiny_model_dir_no_dropout), NUM_LABELS, lora_r=4, lora_alpha=8, ffa=False, seed=0,
                           head=task.head)

    plain, private = model(), model()
    settings = {"loss_fn": task.loss, "epochs": 3, "batch_size": 32, "learning_rate": 0.01}
    train_round(plain, data, dp=None, **settings)
    result = train_round(private, data, dp=DPSettings(noise_multiplier=0.0, max_grad_norm=1e6, sample_rate=1.0),
                         **settings)
    assert result.ran == [(0.0, 1.0, 3)]
    start = adapters.trainable_state(model())
    for key, value in adapters.trainable_state(plain).items():
        torch.testing.assert_close(adapters.trainable_state(private)[key], value, atol=2e-5, rtol=1e-4)
    moved = [k for k, v in adapters.trainable_state(plain).items() if not torch.allclose(v, start[k])]
    assert any(".lora_B." in k for k in moved)


def test_token_loss_is_the_mean_over_each_sentences_labelled_words():
    """One DP record is one sentence: its loss averages its labelled words, whatever their number."""
    task = TASKS["token-classification"]
    logits = torch.randn(2, 5, NUM_LABELS)
    labels = torch.tensor([[-100, 1, -100, -100, -100], [-100, 0, 2, 1, -100]])
    first = torch.nn.functional.cross_entropy(logits[0, 1:2], labels[0, 1:2])
    second = torch.nn.functional.cross_entropy(logits[1, 1:4], labels[1, 1:4])
    torch.testing.assert_close(task.loss(logits, labels), (first + second) / 2)


def test_ffa_lora_aggregation_is_exact(tiny_model_dir):
    """With A frozen and shared, mean(B_i)·A == mean(B_i·A): averaging B averages the low-rank updates."""
    sites = []
    for seed in range(3):
        model = tiny(tiny_model_dir, ffa=True)
        fit(model, make_data(seed=seed), epochs=1, batch_size=16, learning_rate=0.05, dp=None)
        sites.append(model)
    names = [n for n, _ in sites[0].named_parameters() if ".lora_B." in n]
    for b_name in names:
        a_name = b_name.replace(".lora_B.", ".lora_A.")
        a = dict(sites[0].named_parameters())[a_name].detach()
        bs = [dict(m.named_parameters())[b_name].detach() for m in sites]
        assert all(torch.equal(dict(m.named_parameters())[a_name], a) for m in sites)
        torch.testing.assert_close(torch.stack(bs).mean(0) @ a, torch.stack([b @ a for b in bs]).mean(0))
    assert any(not torch.equal(dict(sites[0].named_parameters())[n], torch.zeros_like(dict(sites[0].named_parameters())[n])) for n in names)


def test_plain_lora_averaging_is_not_exact(tiny_model_dir):
    """The reason FFA-LoRA exists: averaging A and B separately differs from averaging B·A."""
    sites = []
    for seed in range(2):
        model = tiny(tiny_model_dir)
        fit(model, make_data(seed=seed), epochs=2, batch_size=8, learning_rate=0.05, dp=None)
        sites.append(dict(model.named_parameters()))
    b_name = next(n for n in sites[0] if ".lora_B." in n)
    a_name = b_name.replace(".lora_B.", ".lora_A.")
    mean_of_products = torch.stack([s[b_name] @ s[a_name] for s in sites]).mean(0)
    product_of_means = torch.stack([s[b_name] for s in sites]).mean(0) @ torch.stack([s[a_name] for s in sites]).mean(0)
    assert not torch.allclose(mean_of_products, product_of_means, atol=1e-6)


def test_saved_adapter_loads_with_peft_from_pretrained(tiny_model_dir, tmp_path):
    model = tiny(tiny_model_dir)
    data = make_data()
    fit(model, data, epochs=2, batch_size=16, learning_rate=0.05, dp=None)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_base_model(str(tiny_model_dir), NUM_LABELS, seed=0), tmp_path / "adapter")
    assert torch.equal(predict(model, data), predict(loaded, data))
