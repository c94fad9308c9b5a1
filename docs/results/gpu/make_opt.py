"""Write a randomly initialised OPT-1.3B-shaped classifier to a folder (no hub on the GPU
machine): the reference preset's compute, not its accuracy. The tokenizer is MiniLM's
(WordPiece, 30,522 tokens), copied from the folder given as the third argument.

    python docs/results/gpu/make_opt.py /tmp/opt 1.3b TOKENIZER_FOLDER
"""

import shutil
import sys

import torch
from transformers import OPTConfig, OPTForSequenceClassification

out, size, tokenizer = sys.argv[1], sys.argv[2], sys.argv[3]
if size == "1.3b":
    shape = {"hidden_size": 2048, "num_hidden_layers": 24, "ffn_dim": 8192}
    shape |= {"num_attention_heads": 32, "word_embed_proj_dim": 2048}
else:  # a tiny one, to check a script on a CPU first
    shape = {"hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128}
    shape |= {"num_attention_heads": 4, "word_embed_proj_dim": 64}
config = OPTConfig(
    vocab_size=30522, max_position_embeddings=2048, pad_token_id=0, bos_token_id=101,
    eos_token_id=102, num_labels=4, **shape,
)
torch.manual_seed(0)
model = OPTForSequenceClassification(config)
model.save_pretrained(out)
for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{tokenizer}/{name}", out)
print("parameters", sum(p.numel() for p in model.parameters()))
