"""`cogbatch.testing.tokenizer`: the tiny checkpoints' tokenizers load offline like the real ones."""

from __future__ import annotations

import json
from pathlib import Path

from cogbatch.model.config import CogVLMConfig
from cogbatch.testing import tokenizer

SENTENCE = "Describe the image in detail. What color is the small square? It is red, 100%."


def load_tokenizer(ckpt: Path):
    from transformers import AutoTokenizer

    # config.json carries the real auto_map: without trust_remote_code=False transformers would prompt.
    return AutoTokenizer.from_pretrained(str(ckpt), trust_remote_code=False, fix_mistral_regex=False)


def test_cogvlm1_tokenizer_loads_offline_like_vicuna(tiny_cogvlm1):
    tok = load_tokenizer(tiny_cogvlm1)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert len(tok) <= CogVLMConfig.from_json(tiny_cogvlm1).vocab_size
    assert tok.convert_tokens_to_ids(["<0x00>", "<0xFF>"]) == [3, 258]  # byte fallback, as SentencePiece
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == 1 and tok.unk_token_id not in ids
    assert len(ids) < len(SENTENCE) / 2  # real merges, not bytes
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    assert tok.decode(tok("naïve café — 日本")["input_ids"], skip_special_tokens=True) == "naïve café — 日本"


def test_cogvlm2_tokenizer_has_the_llama3_special_ids(tiny_cogvlm2, golden_dir):
    tok = load_tokenizer(tiny_cogvlm2)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (128000, 128001, 128002)
    assert tok.convert_tokens_to_ids(["<|eot_id|>", "<|reserved_special_token_0|>"]) == [128009, 128002]
    assert len(tok) == CogVLMConfig.from_json(tiny_cogvlm2).vocab_size == 128256
    golden = json.loads((golden_dir / "cogvlm2" / "dev" / "tokenizer_config.json").read_text())
    golden_specials = {int(i): t["content"] for i, t in golden["added_tokens_decoder"].items()}
    assert {i: tok.convert_ids_to_tokens(i) for i in range(128000, 128256)} == golden_specials
    ids = tok(SENTENCE)["input_ids"]
    assert ids[0] == 128000 and max(ids[1:]) < 1024  # trained pieces, never the filler
    assert len(ids) < len(SENTENCE) / 2
    assert tok.decode(ids, skip_special_tokens=True) == SENTENCE
    assert tok.decode(tok("naïve café — 日本\n  x")["input_ids"], skip_special_tokens=True) == "naïve café — 日本\n  x"


def test_cogvlm2_tokenizer_uses_the_llama3_pre_tokenizer(tiny_cogvlm2):
    pre = json.loads((tiny_cogvlm2 / "tokenizer.json").read_text())["pre_tokenizer"]
    assert pre["pretokenizers"][0]["pattern"]["Regex"] == tokenizer.LLAMA3_SPLIT_PATTERN
    assert pre["pretokenizers"][1]["type"] == "ByteLevel"
