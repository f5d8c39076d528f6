"""Model construction, the wire format, and the training loop on a tiny BERT."""

import numpy as np
import pytest
import torch
from peft import PeftModel

from common import adapters
from common.model import build_base_model, build_model
from common.train import DPSettings, TensorData, predict, train_round

NUM_LABELS = 3


def make_data(n=48, length=12, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab, (n, length), generator=generator)
    input_ids[:, 0] = 2
    labels = torch.randint(0, NUM_LABELS, (n,), generator=generator)
    input_ids[:, 1] = 10 + labels  # a learnable signal
    return TensorData(input_ids, torch.ones_like(input_ids), labels)


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
    train_round(model, make_data(), epochs=1, batch_size=16, learning_rate=0.01, dp=None, seed=0)
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
    train_round(model, make_data(), epochs=1, batch_size=16, learning_rate=0.01,
                dp=DPSettings(noise_multiplier=1.0, max_grad_norm=1.0), seed=0)
    after = adapters.trainable_state(model)
    for kind in (".lora_A.", ".lora_B.", "classifier"):
        assert any(not torch.equal(before[k], after[k]) for k in before if kind in k), kind
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0, "Opacus' hooks must be removed after the round"


def test_dp_without_noise_or_clipping_equals_plain_training(tiny_model_dir_no_dropout):
    """With σ=0, an unreachable clip bound and a full-batch Poisson rate of 1, DP-SGD is plain SGD."""
    data = make_data(n=32)
    plain, private = tiny(tiny_model_dir_no_dropout), tiny(tiny_model_dir_no_dropout)
    train_round(plain, data, epochs=3, batch_size=32, learning_rate=0.01, dp=None, seed=0)
    train_round(private, data, epochs=3, batch_size=32, learning_rate=0.01,
                dp=DPSettings(noise_multiplier=0.0, max_grad_norm=1e6), seed=0)
    start = adapters.trainable_state(tiny(tiny_model_dir_no_dropout))
    for key, value in adapters.trainable_state(plain).items():
        torch.testing.assert_close(adapters.trainable_state(private)[key], value, atol=2e-5, rtol=1e-4)
    moved = [k for k, v in adapters.trainable_state(plain).items() if not torch.allclose(v, start[k])]
    assert any(".lora_B." in k for k in moved)


def test_ffa_lora_aggregation_is_exact(tiny_model_dir):
    """With A frozen and shared, mean(B_i)·A == mean(B_i·A): averaging B averages the low-rank updates."""
    sites = []
    for seed in range(3):
        model = tiny(tiny_model_dir, ffa=True)
        train_round(model, make_data(seed=seed), epochs=1, batch_size=16, learning_rate=0.05, dp=None, seed=seed)
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
        train_round(model, make_data(seed=seed), epochs=2, batch_size=8, learning_rate=0.05, dp=None, seed=seed)
        sites.append(dict(model.named_parameters()))
    b_name = next(n for n in sites[0] if ".lora_B." in n)
    a_name = b_name.replace(".lora_B.", ".lora_A.")
    mean_of_products = torch.stack([s[b_name] @ s[a_name] for s in sites]).mean(0)
    product_of_means = torch.stack([s[b_name] for s in sites]).mean(0) @ torch.stack([s[a_name] for s in sites]).mean(0)
    assert not torch.allclose(mean_of_products, product_of_means, atol=1e-6)


def test_saved_adapter_loads_with_peft_from_pretrained(tiny_model_dir, tmp_path):
    model = tiny(tiny_model_dir)
    data = make_data()
    train_round(model, data, epochs=2, batch_size=16, learning_rate=0.05, dp=None, seed=0)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(build_base_model(str(tiny_model_dir), NUM_LABELS, seed=0), tmp_path / "adapter")
    _, expected = predict(model, data)
    _, got = predict(loaded, data)
    assert np.array_equal(expected, got)
