"""Tiny language models and GLUE files for the tests (and the docs fixture): a word-level tokenizer, a 2-layer
Llama or BERT saved with save_pretrained, and GLUE-format TSV files of a learnable toy task (the label says
whether the keyword "good" occurs)."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          PreTrainedTokenizerFast)

from grft_vision.llm import GlueExample

WORDS = ["cat", "dog", "sat", "on", "the", "mat", "a", "ran", "big", "small", "red", "blue", "bad", "tree"]
KEYWORD = "good"



def make_tokenizer(kind: str, eos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: Llama-like (BOS, EOS, no pad token) or BERT-like ([CLS] a [SEP] b [SEP], [PAD])."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(specials + WORDS + [KEYWORD])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "llama":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", vocab["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", unk_token="[UNK]",
                                       **({"eos_token": "</s>"} if eos else {}))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]",
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def save_tiny(folder: Path, kind: str, eos: bool = True, positions: int = 64) -> Path:
    tokenizer = make_tokenizer(kind, eos)
    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        model = LlamaForSequenceClassification(config)
    else:
        config = BertConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
        model = BertForSequenceClassification(config)
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
    if label:
        words.insert(rng.randrange(len(words) + 1), KEYWORD)
    return " ".join(words)


def toy_examples(count: int, seed: int, pair: bool = False, positive: float = 0.5) -> list[GlueExample]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = int(rng.random() < positive)
        texts = (sentence(rng, label), sentence(rng, 0)) if pair else (sentence(rng, label),)
        examples.append(GlueExample(texts, label))
    return examples


def write_glue(root: Path, task: str, counts: dict[str, int], seed: int = 0) -> Path:
    """GLUE-format TSV files of the toy task in root/<GLUE folder>/<split>.tsv."""
    folder = {"cola": "CoLA", "mrpc": "MRPC", "rte": "RTE"}[task]
    (root / folder).mkdir(parents=True, exist_ok=True)
    for offset, (split, count) in enumerate(counts.items()):
        examples = toy_examples(count, seed + offset, pair=task != "cola", positive=0.7 if task == "cola" else 0.5)
        if task == "cola":
            lines = [f"gj04\t{e.label}\t{'' if e.label else '*'}\t{e.texts[0]}" for e in examples]
        elif task == "mrpc":
            lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
            lines += [f"{e.label}\t{i}\t{i + 1}\t{e.texts[0]}\t{e.texts[1]}" for i, e in enumerate(examples)]
        else:
            lines = ["index\tsentence1\tsentence2\tlabel"]
            lines += [f"{i}\t{e.texts[0]}\t{e.texts[1]}\t{('entailment', 'not_entailment')[e.label]}"
                      for i, e in enumerate(examples)]
        (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root
