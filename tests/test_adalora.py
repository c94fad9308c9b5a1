"""AdaLoRA in the round engine: pruning on schedule, payload from kept ranks, exact edge copy."""

from __future__ import annotations

import torch

from airlora.config import LinkConfig
from airlora.engine import RoundEngine
from airlora.link import build_link
from airlora.model.adalora import AdaLoRAModel


def _engine(cfg, target_rank=1, rounds=4, steps=5):
    model = type(cfg.model).model_validate(
        {**cfg.model.model_dump(), "adapter": "adalora", "adalora": {"target_rank": target_rank}}
    )
    train = type(cfg.train).model_validate(
        {**cfg.train.model_dump(), "rounds": rounds, "steps_per_round": steps}
    )
    return RoundEngine.build(cfg.data, model, train, build_link(LinkConfig()), seed=0)


def test_adalora_prunes_to_budget_and_counts_kept_ranks(tiny_finetune_config):
    engine = _engine(tiny_finetune_config)
    server = engine.server
    assert isinstance(server, AdaLoRAModel) and server.r_max == 4
    rounds = [engine.run_round(None, 10.0) for _ in range(4)]
    first, last = sum(rounds[0].rank_vector), sum(rounds[-1].rank_vector)
    m = server.num_projections
    assert first > last and last == 1 * m  # PEFT's schedule ends at target_r per projection
    for r in rounds:
        expected = sum(
            k * (p.d_in + p.d_out + 1)
            for k, p in zip(r.rank_vector, server.projections, strict=True)
        )
        assert r.adapter_params == expected
        assert r.payload_params == expected + r.head_params


def test_adalora_edge_copy_matches_the_server_on_a_perfect_link(tiny_finetune_config):
    engine = _engine(tiny_finetune_config, target_rank=2, rounds=2, steps=4)
    engine.run_round(None, 10.0)
    engine.run_round(None, 10.0)
    batch_idx = list(range(8))
    from airlora.data import collate

    batch = collate(engine.task.edge_eval, batch_idx, engine.pad_token_id)
    engine.server.peft_model.eval()
    engine.edge.peft_model.eval()
    with torch.no_grad():
        a = engine.server.peft_model(**batch).logits
        b = engine.edge.peft_model(**batch).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_adalora_export_gives_the_edge_logits_exactly_with_peft_alone(
    tiny_finetune_config, tmp_path
):
    """The exported AdaLoRA folder, loaded by PEFT on a fresh base model, reproduces the
    edge model's logits (pruned ranks and all), not just its adapter type."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from airlora.data import collate

    engine = _engine(tiny_finetune_config, target_rank=1, rounds=3, steps=4)
    for _ in range(3):
        engine.run_round(None, 10.0)
    assert sum(engine.edge.rank_vector) < engine.edge.r_max * engine.edge.num_projections
    folder = engine.edge.export_peft(tmp_path / "ada")
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_finetune_config.model.name_or_path, num_labels=4
    )
    loaded = PeftModel.from_pretrained(base, folder).eval()
    assert loaded.peft_config["default"].peft_type.value == "ADALORA"
    batch = collate(engine.task.edge_eval, list(range(16)), engine.pad_token_id)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    engine.edge.peft_model.eval()
    with torch.no_grad():
        expected = engine.edge.peft_model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)
