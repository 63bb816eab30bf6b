"""A tiny, randomly initialised BERT and a tokenizer of the data's own characters, made offline: its
answers mean nothing, it shows that the pipeline runs end to end."""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from transformers import BertConfig, BertForQuestionAnswering


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_tiny_tokenizer(texts: list[str], isolate_digits: bool = False):
    """A fast BERT (WordPiece) tokenizer whose vocabulary is every character of ``texts`` (others: [UNK]),
    plus ASCII letters and digits with and without ``##``, so that words and numbers split into characters.
    Its files are written to a temporary folder, removed once loaded (``save_pretrained`` keeps a copy)."""
    from .models import load_tokenizer      # models builds the tiny model: imported when needed
    chars = sorted({c for text in texts for c in text.lower() if not c.isspace()})
    ascii_chars = string.ascii_lowercase + string.digits
    vocab = SPECIAL_TOKENS + [c for c in chars if c not in ascii_chars] + list(ascii_chars)
    vocab += ["##" + c for c in ascii_chars]
    with tempfile.TemporaryDirectory(prefix="hw7qa-tiny-tokenizer-") as folder:
        (Path(folder) / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "BertTokenizer", "do_lower_case": True, "tokenize_chinese_chars": True,
            "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
            "mask_token": "[MASK]", "model_max_length": 512}), encoding="utf-8")
        return load_tokenizer(folder, isolate_digits)


def build_tiny_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised ``BertForQuestionAnswering`` small enough to train on a CPU in seconds."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=512)
    return BertForQuestionAnswering(config)
