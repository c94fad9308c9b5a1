from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from airlora.model import ModelError, RankedLoRAModel, load_model
from conftest import tiny_decoder


@pytest.fixture
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), num_labels=4, seed=0)
    base_copy = copy.deepcopy(loaded.model)
    model = RankedLoRAModel.from_base(loaded.model, r_max=4, lora_alpha=8)
    with torch.no_grad():  # B starts at zero; give the adapters something to say
        gen = torch.Generator().manual_seed(0)
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    batch = loaded.tokenizer(
        ["the team won the cup", "stocks fell as oil prices rose in trade"],
        return_tensors="pt",
        padding=True,
    )
    return model, base_copy, batch


def logits(model: torch.nn.Module, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def test_default_targets_give_one_projection_per_attention_matrix(tiny):
    model, _, _ = tiny
    # 2 layers x (query, key, value, attention output)
    assert model.num_projections == 8
    assert model.projections[0].name == "bert.encoder.layer.0.attention.self.query"
    assert model.projections[3].name == "bert.encoder.layer.0.attention.output.dense"
    assert model.rank_vector == [4] * 8


def test_payload_matches_a_hand_count(tiny):
    model, _, _ = tiny
    ranks = [0, 1, 2, 3, 4, 0, 1, 2]
    payload = model.payload(ranks)
    # every projection is 32 -> 32: r (32 + 32); head: classifier 32 x 4 + 4
    assert payload.per_projection == tuple(64 * r for r in ranks)
    assert payload.adapter_params == 64 * 13
    assert payload.head_params == 132
    assert payload.max_total_params == 8 * 4 * 64 + 132
    model.set_rank_vector(ranks)
    sent = model.active_tensors()
    assert sum(t.numel() for t in sent.values()) == payload.total_params
    assert sent["bert.encoder.layer.0.attention.self.key.lora_A"].shape == (1, 32)
    assert sent["bert.encoder.layer.0.attention.self.key.lora_B"].shape == (32, 1)
    assert "bert.encoder.layer.0.attention.self.query.lora_A" not in sent  # rank 0: nothing sent


@pytest.mark.parametrize("ranks", [[4] * 8, [0, 1, 2, 3, 4, 3, 2, 1], [2] * 8])
def test_export_loads_in_plain_peft_with_the_same_logits(tiny, tmp_path, ranks):
    model, base_copy, batch = tiny
    model.set_rank_vector(ranks)
    expected = logits(model.peft_model, batch)
    folder = model.export_peft(tmp_path / "adapter")
    assert (folder / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(base_copy, str(folder))
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)
    config = loaded.peft_config["default"]
    active = {p.name: r for p, r in zip(model.projections, ranks, strict=True) if r}
    assert dict(config.rank_pattern) == active


def test_rank_mask_equals_truncated_factors(tiny):
    """Masking components beyond r_i is the same as zeroing them."""
    model, _, batch = tiny
    ranks = [1, 2, 3, 4, 0, 1, 2, 3]
    model.set_rank_vector(ranks)
    masked = logits(model.peft_model, batch)
    clone = copy.deepcopy(model)
    clone.set_rank_vector([4] * 8)
    with torch.no_grad():
        for layer, r in zip(clone._layers, ranks, strict=True):
            layer.lora_A["default"].weight[r:] = 0
    torch.testing.assert_close(logits(clone.peft_model, batch), masked, atol=1e-6, rtol=0)


def test_lower_then_raise_restores_trained_values_after_optimiser_steps(tiny):
    model, _, batch = tiny
    params = model.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)
    labels = torch.tensor([1, 2])

    def step() -> None:
        model.peft_model.train()
        loss = model.peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.restore_inactive()

    step()  # momentum exists for every component now
    before = [p.detach().clone() for p in params]
    model.set_rank_vector([1] * 8)
    for _ in range(3):
        step()
    after = [p.detach() for p in params]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if i % 2 == 0:  # lora_A: rows 1.. frozen, row 0 trained
            assert torch.equal(a[1:], b[1:])
            assert not torch.equal(a[:1], b[:1])
        else:  # lora_B: columns 1.. frozen
            assert torch.equal(a[:, 1:], b[:, 1:])
    model.set_rank_vector([4] * 8)
    for b, a in zip(before, params, strict=True):
        if a.shape[0] == 4:
            assert torch.equal(a[1:], b[1:])


def test_set_rank_vector_does_not_reallocate(tiny):
    model, _, _ = tiny
    ptrs = [p.data_ptr() for p in model.lora_parameters()]
    masks = [layer.lora_A["default"].rank_mask.data_ptr() for layer in model._layers]
    model.set_rank_vector([0, 1, 2, 3, 4, 3, 2, 1])
    model.set_rank_vector([4] * 8)
    assert [p.data_ptr() for p in model.lora_parameters()] == ptrs
    assert [layer.lora_A["default"].rank_mask.data_ptr() for layer in model._layers] == masks


@pytest.mark.parametrize(
    "ranks, message",
    [
        ([4] * 7, "has 7 entries; the model has 8"),
        ([5] + [4] * 7, "outside 0..r_max=4"),
        ([-1] + [4] * 7, "outside 0..r_max=4"),
    ],
)
def test_bad_rank_vectors_are_refused(tiny, ranks, message):
    model, _, _ = tiny
    with pytest.raises(ValueError, match=message):
        model.set_rank_vector(ranks)


def test_edge_rebuilds_from_received_tensors(tiny, tiny_model_dir):
    model, _, batch = tiny
    ranks = [3, 0, 2, 4, 1, 1, 0, 4]
    model.set_rank_vector(ranks)
    edge = RankedLoRAModel.from_base(
        load_model(str(tiny_model_dir), 4, seed=1).model, r_max=4, lora_alpha=8
    )
    edge.load_active_tensors(model.active_tensors(), ranks)
    torch.testing.assert_close(
        logits(edge.peft_model, batch), logits(model.peft_model, batch), atol=1e-6, rtol=0
    )


def test_r_max_must_be_positive(tiny_model_dir):
    with pytest.raises(ValueError, match="r_max must be positive"):
        RankedLoRAModel.from_base(load_model(str(tiny_model_dir), 4).model, r_max=0)


def test_model_folder_without_weights_is_refused(tmp_path, tiny_model_dir):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="holds no weights"):
        load_model(str(folder), 4)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing"), 4)


@pytest.mark.parametrize("family, expected", [("gpt2", 4), ("llama", 8)])
def test_decoder_families_get_default_targets_and_export_exactly(family, expected, tmp_path):
    base = tiny_decoder(family, vocab_size=50, num_labels=3, pad_token_id=0)
    base_copy = copy.deepcopy(base)
    model = RankedLoRAModel.from_base(base, r_max=4, lora_alpha=8)
    assert model.num_projections == expected
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ranks = [(i % 4) + 1 for i in range(expected)]
    ranks[0] = 0
    model.set_rank_vector(ranks)
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
    }
    expected_logits = logits(model.peft_model, batch)
    loaded = PeftModel.from_pretrained(base_copy, str(model.export_peft(tmp_path / "a")))
    torch.testing.assert_close(logits(loaded, batch), expected_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("adapter", ["lora", "svd", "adalora"])
def test_one_lora_scale_rule_for_every_method_and_r_max(tiny_model_dir, adapter):
    """Unset lora_alpha means 2 r_max: a scale of 2 whatever r_max, for every adapter (a fixed
    alpha would make r_max 8 eight times weaker than r_max 1 here)."""
    from airlora.config import ModelConfig, TrainConfig
    from airlora.engine import build_adapter

    scales = []
    for r_max in (2, 8):
        config = ModelConfig(name_or_path=str(tiny_model_dir), r_max=r_max, adapter=adapter)
        assert config.alpha == 2.0 * r_max
        base = load_model(str(tiny_model_dir), 4, seed=0).model
        wrapped = build_adapter(base, config, TrainConfig(rounds=2, steps_per_round=2), 0.0)
        # AdaLoRA's layers divide their scaling (alpha) by ranknum (r_max) in the forward.
        found = {
            round(
                float(m.scaling["default"])
                / float(m.ranknum["default"] if hasattr(m, "ranknum") else 1.0),
                4,
            )
            for m in wrapped.peft_model.modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling
        }
        assert len(found) == 1
        scales.append(found.pop())
    assert scales[0] == pytest.approx(scales[1])
    fixed = ModelConfig(name_or_path=str(tiny_model_dir), r_max=8, lora_alpha=16)
    assert fixed.alpha == 16.0
