#!/usr/bin/env python3
"""Build a tiny random-weight Llama and a byte-level BPE tokenizer, locally, no hub.

  python make_tiny_model.py OUT_DIR   (run with the real-vLLM venv's python)
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def corpus() -> list[str]:
    """Local text to train the tokenizer on: the standard library's own sources."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]
    return [f.read_text(errors="replace") for f in files]


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>",
                                                                   "<pad>"])
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                          "{% endfor %}assistant:")
    fast.save_pretrained(out)
    # The CPU attention backend takes head sizes 32, 64, ...: 128 hidden / 2 heads = 64.
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3, torch_dtype="float32")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    print(f"tiny model written to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
