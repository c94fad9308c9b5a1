"""Write a randomly initialised RoBERTa-base-shaped classifier to a folder (no hub on the GPU
machine): the paper preset's compute, not its accuracy. The tokenizer is MiniLM's (WordPiece,
30,522 tokens against RoBERTa's 50,265 BPE tokens: a smaller embedding, the same encoder),
copied from the folder given as the third argument.

    python docs/results/gpu/make_roberta.py /tmp/roberta base TOKENIZER_FOLDER
"""

import shutil
import sys

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

out, size, tokenizer = sys.argv[1], sys.argv[2], sys.argv[3]
if size == "base":
    shape = {"hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 3072}
    shape |= {"num_attention_heads": 12}
else:  # a tiny one, to check a script on a CPU first
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128}
    shape |= {"num_attention_heads": 4}
config = RobertaConfig(
    vocab_size=30522, max_position_embeddings=514, pad_token_id=0, bos_token_id=101,
    eos_token_id=102, type_vocab_size=1, num_labels=4, **shape,
)
torch.manual_seed(0)
model = RobertaForSequenceClassification(config)
model.save_pretrained(out)
for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{tokenizer}/{name}", out)
print("parameters", sum(p.numel() for p in model.parameters()))
