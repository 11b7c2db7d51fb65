"""Tokenizers for tiny checkpoints, trained on a small built-in English corpus, deterministically.

A vicuna-like byte-fallback BPE for CogVLM, a Llama-3-like byte-level BPE with the 256 Llama-3 special
tokens at their real ids (128000..128255) for CogVLM2, each with the tokenizer_config.json and
special_tokens_map.json that `AutoTokenizer` reads. Same corpus, same files: byte-identical output.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from cogbatch.model.config import CogVLMConfig

LLAMA3_VOCAB_SIZE = 128_256  # 128000 BPE entries + 256 special tokens
LLAMA3_FIRST_SPECIAL_ID = 128_000
LLAMA3_PAD_TOKEN = "<|reserved_special_token_0|>"  # id 128002: CogVLM2's pad and image placeholder
# The Llama-3 pre-tokenizer regex (tiktoken's cl100k pattern), as in the real tokenizer.json.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in vicuna; 256 byte tokens follow
_LLAMA2_BASE_VOCAB = len(LLAMA2_SPECIALS) + 256

# A fixed training corpus: caption and VQA vocabulary, the words of the chat templates, digits
# and punctuation, so that every prompt the tests use tokenizes into real (non-byte) pieces.
_CORPUS = (
    "Describe this image.",
    "Describe the image in detail.",
    "Describe the picture in one sentence.",
    "Write a short caption for this photo, please mention the colors and the shapes.",
    "Write a detailed caption for the picture.",
    "What is in the picture?",
    "What is the color of the small square in the picture?",
    "What color is the large circle?",
    "What is the person holding in the photo?",
    "How many objects are there in the image?",
    "How many people are standing near the table?",
    "Is there a dog in the photo? Answer yes or no.",
    "Where is the red square?",
    "Which shape is on the left side of the image?",
    "Question: What is shown in the image? Answer: A red square and a green circle.",
    "Question: Describe this image. Answer: A blue triangle on a white background.",
    "USER: What is in the picture? ASSISTANT: A red square and a green circle.",
    "USER: Describe the photo. ASSISTANT: A cat is sitting on a wooden chair near the window.",
    "A red square and a green circle.",
    "A small red square is in the top left corner of the picture.",
    "A large green circle is in the center of the image.",
    "A blue triangle and a yellow star on a black background.",
    "The square is red, the circle is green and the triangle is blue.",
    "The colors are red, green, blue, yellow, orange, purple, black, white, gray and brown.",
    "The photo shows a dog playing with a ball in the park.",
    "The picture shows a man riding a bicycle on the street.",
    "The image shows two people sitting at a table with food and drinks.",
    "A woman is holding an umbrella in the rain.",
    "A bowl of fruit with apples, bananas and oranges on a kitchen table.",
    "A city street at night with cars, buses and bright lights.",
    "A mountain lake under a clear blue sky with white clouds.",
    "A child is reading a book on a sofa in the living room.",
    "There are three apples and two bananas on the plate.",
    "There is one cat and there are 2 dogs in the garden.",
    "The answer is yes. The answer is no.",
    "The caption of the photo: a sunny beach with people and colorful umbrellas.",
    "Answer the question about the image with a single word or phrase.",
    "Please answer the question in detail and explain the answer.",
    "The question asks about the color of the square, the answer is red.",
    "In the image, a brown horse is standing in a green field next to a fence.",
    "The room has white walls, a wooden floor, a bed and a small desk with a lamp.",
    "Two birds are flying over the water near the boats.",
    "A plate of pasta with tomato sauce and cheese.",
    "The train is arriving at the station, and people are waiting on the platform.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 2024.",
    "Shapes: square, circle, triangle, rectangle, star, line, dot.",
    "Positions: left, right, top, bottom, center, corner, above, below, next to.",
    "Sizes: small, large, big, tiny, long, short, tall, wide.",
    "This is a photo of a square. This is a picture of a circle. This is an image of a line.",
    "Can you describe the colors and the shapes in this picture?",
    "What does the text in the image say? The text says hello world.",
    "The image is a simple drawing with a red square, a green circle and a blue line.",
)


def build_tokenizer(cfg: CogVLMConfig) -> tuple[Tokenizer, dict[str, Any], dict[str, str]]:
    """(tokenizer, tokenizer_config.json, special_tokens_map.json) for the config's generation."""
    if cfg.generation == "cogvlm2":
        return (
            _llama3_tokenizer(),
            _llama3_tokenizer_config(),
            {
                "bos_token": "<|begin_of_text|>",
                "eos_token": "<|end_of_text|>",
                "pad_token": LLAMA3_PAD_TOKEN,
            },
        )
    return (
        _llama2_tokenizer(cfg.vocab_size),
        _llama2_tokenizer_config(),
        {
            "bos_token": "<s>",
            "eos_token": "</s>",
            "pad_token": "<unk>",
            "unk_token": "<unk>",
        },
    )


def _train_bpe(pre_tokenizer: pre_tokenizers.PreTokenizer, trainer: trainers.BpeTrainer) -> dict[str, Any]:
    """Train on the built-in corpus and return the BPE model (vocab and merges) as JSON.

    The trainer sorts its alphabet and breaks count ties by token ids, so the result does not
    depend on threads or hash seeds.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return json.loads(tok.to_str())["model"]


def _merge_pairs(merges: list[Any]) -> list[tuple[str, str]]:
    """Merges as pairs, whichever of the two JSON spellings ("a b" or ["a", "b"]) tokenizers used."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _llama2_tokenizer(vocab_size: int) -> Tokenizer:
    """A vicuna-like BPE: <unk> <s> </s>, the 256 byte-fallback tokens <0x00>..<0xFF>, then merges.

    Trained with a Metaspace split so merges never cross words; used with the same normalizer
    (prepend and replace by "▁") and decoder as the Llama-2 tokenizer.json that transformers
    converts from vicuna's SentencePiece model.
    """
    trained = _train_bpe(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        trainers.BpeTrainer(vocab_size=max(vocab_size - _LLAMA2_BASE_VOCAB, 1), min_frequency=2, show_progress=False),
    )
    if _LLAMA2_BASE_VOCAB + len(trained["vocab"]) > vocab_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for the cogvlm1 tiny tokenizer: it needs {_LLAMA2_BASE_VOCAB} "
            f"special and byte tokens plus the corpus alphabet (at least "
            f"{_LLAMA2_BASE_VOCAB + len(trained['vocab'])} in all)"
        )
    vocab = {t: i for i, t in enumerate(LLAMA2_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(LLAMA2_SPECIALS) + b for b in range(256)})
    for token, i in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab[token] = _LLAMA2_BASE_VOCAB + i
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merge_pairs(trained["merges"]), unk_token="<unk>", fuse_unk=True, byte_fallback=True
        )
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA2_SPECIALS])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def _llama2_tokenizer_config() -> dict[str, Any]:
    """As vicuna-7b-v1.5 (which cogvlm-chat-hf uses): pad is <unk> = 0, bos added, eos not."""
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<unk>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 4096,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens, in id order from 128000 (`<|eot_id|>` is 128009)."""
    named = {
        0: "<|begin_of_text|>",
        1: "<|end_of_text|>",
        6: "<|start_header_id|>",
        7: "<|end_header_id|>",
        9: "<|eot_id|>",
    }
    reserved = iter(range(256))
    return [named.get(i) or f"<|reserved_special_token_{next(reserved)}|>" for i in range(256)]


def _llama3_tokenizer() -> Tokenizer:
    """A byte-level BPE shaped like Llama-3's: real pieces first, filler up to 127999, then specials.

    The filler entries `<|tiny_unused_i|>` are never produced from text (no merge builds them);
    they exist so the special tokens get their real ids, which the reference code hard-codes.
    """
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trained = _train_bpe(
        pre_tokenizer,
        trainers.BpeTrainer(
            vocab_size=1024, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    vocab = dict(sorted(trained["vocab"].items(), key=lambda kv: kv[1]))
    for i in range(len(vocab), LLAMA3_FIRST_SPECIAL_ID):
        vocab[f"<|tiny_unused_{i}|>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_merge_pairs(trained["merges"])))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in llama3_special_tokens()])
    tok.pre_tokenizer = pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|>:0 $A:0",
        pair="<|begin_of_text|>:0 $A:0 <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", LLAMA3_FIRST_SPECIAL_ID)],
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _llama3_tokenizer_config() -> dict[str, Any]:
    """As Meta-Llama-3, loaded through PreTrainedTokenizerFast, with the pad token set.

    The real Llama-3 tokenizer has no pad token; the reference `build_conversation_input_ids` sets
    `tokenizer.pad_token_id = 128002` itself. Writing it here lets generic tooling pad batches.

    clean_up_tokenization_spaces is off (the real file says true): it would strip spaces before
    punctuation on decode, and transformers 5 ignores it for BPE with a warning anyway.
    """
    added = {
        str(LLAMA3_FIRST_SPECIAL_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in enumerate(llama3_special_tokens())
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end_of_text|>",
        "pad_token": LLAMA3_PAD_TOKEN,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
