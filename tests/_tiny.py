"""Shared builders for tests: a tiny byte-level BPE tokenizer trained in-process (no downloads)."""
from __future__ import annotations

TEXT = ("The quick brown fox jumps over the lazy dog. Matryoshka dolls nest inside each other, "
        "and so do the bits of an integer: the top two bits of an eight bit code are a two bit code. ")


def bpe_tokenizer(vocab_size: int = 320, repeats: int = 40):
    """Byte-level BPE (256 byte tokens + merges + <unk> <s> </s>); at most vocab_size + 3 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * repeats], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
