"""A few checks on the real default model (all-MiniLM-L6-v2 from its PyPI package)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from airlora import run_finetune
from airlora.config import FinetuneConfig
from airlora.model import RankedLoRAModel, load_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    return load_model("default", num_labels=4, seed=0)


def test_default_model_has_24_attention_projections_and_exports_exactly(minilm, tmp_path):
    base_copy = copy.deepcopy(minilm.model)
    model = RankedLoRAModel.from_base(copy.deepcopy(minilm.model), r_max=8)
    assert model.num_projections == 24
    assert model.payload().max_adapter_params == 24 * 8 * (384 + 384)
    assert model.payload().head_params == 384 * 4 + 4
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in model.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ranks = [(3 * i) % 9 for i in range(24)]
    model.set_rank_vector(ranks)
    batch = minilm.tokenizer(
        ["Stocks slid as oil hit a record.", "The Red Sox won the pennant."],
        return_tensors="pt",
        padding=True,
    )
    model.peft_model.eval()
    with torch.no_grad():
        expected = model.peft_model(**batch).logits
    folder = model.export_peft(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(base_copy, str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=0)


def test_short_finetune_on_the_packaged_ag_news_sample(tmp_path):
    config = FinetuneConfig.model_validate(
        {
            "data": {"source": "ag_news", "edge_eval_size": 128, "max_train_samples": 2000},
            "train": {"rounds": 3, "steps_per_round": 12, "warmup_steps": 4},
            "final_test": False,
            "out_dir": str(tmp_path),
            "run_name": "ag",
        }
    )
    result = run_finetune(config)
    # 36 steps of batch 16 already lift a pretrained encoder far above chance (0.25)
    assert result.rounds[-1]["accuracy"] > 0.6
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["summary"]["training_steps"] == 36
