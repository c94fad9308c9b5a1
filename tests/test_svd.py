"""SVD-form adapters (P diag(E) Q with a rank mask): the function, the payload, the
penalty, training that leaves inactive components alone, transmission and PEFT export."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from airlora.model import RankedSVDModel, load_model


@pytest.fixture
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), num_labels=4, seed=0)
    base_copy = copy.deepcopy(loaded.model)
    torch.manual_seed(0)
    model = RankedSVDModel.from_base(loaded.model, r_max=4, lora_alpha=8)
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


def _give_singular_values(model: RankedSVDModel) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model._layers:
            layer.lora_A["default"].singular.copy_(torch.randn(4, generator=gen))


def test_starts_as_the_base_model_and_is_p_diag_e_q(tiny):
    model, base_copy, batch = tiny
    torch.testing.assert_close(logits(model.peft_model, batch), logits(base_copy, batch))
    _give_singular_values(model)
    ranks = [1, 2, 3, 4, 0, 1, 2, 3]
    model.set_rank_vector(ranks)
    # The same function by hand: delta W = (alpha / r_max) P[:, :r] diag(E[:r]) Q[:r].
    by_hand = copy.deepcopy(base_copy)
    modules = dict(by_hand.named_modules())
    with torch.no_grad():
        for proj, layer, r in zip(model.projections, model._layers, ranks, strict=True):
            a = layer.lora_A["default"]
            p, q, e = layer.lora_B["default"].weight[:, :r], a.weight[:r], a.singular[:r]
            modules[proj.name].weight += (8 / 4) * p @ torch.diag(e) @ q
    torch.testing.assert_close(
        logits(model.peft_model, batch), logits(by_hand, batch), atol=1e-5, rtol=0
    )


def test_payload_counts_one_singular_value_per_rank(tiny):
    model, _, _ = tiny
    ranks = [0, 1, 2, 3, 4, 0, 1, 2]
    payload = model.payload(ranks)
    assert payload.per_projection == tuple(65 * r for r in ranks)  # r (32 + 32 + 1)
    model.set_rank_vector(ranks)
    sent = model.active_tensors()
    assert sum(t.numel() for t in sent.values()) == payload.total_params
    assert sent["bert.encoder.layer.0.attention.self.value.lora_E"].shape == (2,)


def test_orthogonality_penalty_is_the_hand_computation(tiny):
    model, _, _ = tiny
    ranks = [2, 0, 1, 3, 4, 2, 1, 0]
    model.set_rank_vector(ranks)
    terms = []
    for layer, r in zip(model._layers, ranks, strict=True):
        if r:
            q = layer.lora_A["default"].weight[:r].detach().double()
            p = layer.lora_B["default"].weight[:, :r].detach().double()
            terms.append(
                float(((q @ q.T - torch.eye(r, dtype=torch.float64)) ** 2).sum())
                + float(((p.T @ p - torch.eye(r, dtype=torch.float64)) ** 2).sum())
            )
    expected = 0.01 * sum(terms) / len(terms)
    assert float(model.regularization().detach()) == pytest.approx(expected, rel=1e-5)


def test_training_leaves_inactive_components_and_singular_values_alone(tiny):
    model, _, batch = tiny
    _give_singular_values(model)
    optimizer = torch.optim.AdamW(model.lora_parameters(), lr=0.05, weight_decay=0.1)
    labels = torch.tensor([1, 2])
    model.set_rank_vector([2] * 8)
    before = model.snapshot()
    for _ in range(3):
        model.peft_model.train()
        loss = model.peft_model(**batch, labels=labels).loss + model.regularization()
        loss.backward()
        optimizer.step()
        model.restore_inactive()
        optimizer.zero_grad()
    after = model.snapshot()
    for i in range(8):
        assert torch.equal(after[f"{i}.E"][2:], before[f"{i}.E"][2:])
        assert not torch.equal(after[f"{i}.E"][:2], before[f"{i}.E"][:2])
        assert torch.equal(after[f"{i}.A"][2:], before[f"{i}.A"][2:])
        assert torch.equal(after[f"{i}.B"][:, 2:], before[f"{i}.B"][:, 2:])
    model.restore(before)
    assert all(torch.equal(v, before[k]) for k, v in model.snapshot().items())


def test_edge_rebuild_and_peft_export_give_the_same_logits(tiny, tiny_model_dir, tmp_path):
    model, base_copy, batch = tiny
    _give_singular_values(model)
    ranks = [3, 0, 2, 4, 1, 1, 0, 4]
    model.set_rank_vector(ranks)
    expected = logits(model.peft_model, batch)
    edge = RankedSVDModel.from_base(
        load_model(str(tiny_model_dir), 4, seed=1).model, r_max=4, lora_alpha=8
    )
    edge.load_active_tensors(model.active_tensors(), ranks)
    torch.testing.assert_close(logits(edge.peft_model, batch), expected, atol=1e-6, rtol=0)
    folder = model.export_peft(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base_copy, str(folder))  # plain PEFT, no airlora
    torch.testing.assert_close(logits(loaded, batch), expected, atol=1e-5, rtol=0)


def test_an_online_run_trains_svd_adapters(tiny_model_dir, tiny_data_dir, tmp_path):
    from airlora.config import RunConfig
    from airlora.online import run_online
    from conftest import tiny_task_sections

    sections = tiny_task_sections(tiny_model_dir, tiny_data_dir)
    config = RunConfig.model_validate(
        {
            **sections,
            "model": {**sections["model"], "adapter": "svd"},
            "method": "heuristic",
            "formulation": "online",
            "link": {"scheme": "shannon"},
            "train": {"warmup_steps": 0, "learning_rate": 1e-2, "threads": 1},
            "online": {"steps": 6, "episode_steps": 3, "validate_every": 3, "bandwidth_hz": 1e6},
            "out_dir": str(tmp_path / "runs"),
        }
    )
    run_dir, rows, summary = run_online(config)
    assert summary["trained_steps"] > 0 and 0 <= summary["test_accuracy"] <= 1
    m = len(rows[0]["rank_vector"])
    for row in rows:  # every rank costs d_in + d_out + 1 = 65 parameters here
        assert row["payload_params"] == 65 * sum(row["rank_vector"]) and m == 8
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_the_engine_trains_the_orthogonality_penalty_but_reports_the_task_loss(
    tiny_finetune_config,
):
    from airlora.engine import RoundEngine
    from airlora.link import build_link

    def engine(weight: float) -> RoundEngine:
        cfg = tiny_finetune_config
        model = cfg.model.model_copy(update={"adapter": "svd", "svd_orth_reg_weight": weight})
        return RoundEngine.build(cfg.data, model, cfg.train, build_link(cfg.link), cfg.seed)

    losses, batches, engines = [], [], []
    for weight in (0.0, 10.0):  # built and stepped in turn: the same RNG draws (dropout) each
        e = engine(weight)
        batches.append(e.stream.next_index())
        if not engines:
            q0 = [layer.lora_A["default"].weight.detach().clone() for layer in e.server._layers]
        losses.append(e.train_steps([batches[-1]]))
        engines.append(e)
    plain, penalised = engines
    assert (batches[0] == batches[1]).all()
    # Same init, same batch: the reported loss is the task's (E = 0, so no update has acted).
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    # E = 0 stops the task gradient to P and Q: only the penalty moves Q.
    q_plain = [layer.lora_A["default"].weight for layer in plain.server._layers]
    q_pen = [layer.lora_A["default"].weight for layer in penalised.server._layers]
    assert all(torch.equal(a, b) for a, b in zip(q0, q_plain, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(q0, q_pen, strict=True))
