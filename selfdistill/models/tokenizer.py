"""A character-level tokenizer for the tiny default model, saved in Hugging Face format.

One token per printable ASCII character plus newline, and four specials. It is a real
`tokenizers` tokenizer wrapped as `PreTrainedTokenizerFast`, so transformers and vLLM
load it from the model folder like any other.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character tokenizer (ids: specials 0-3, then newline and ASCII 32-126)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARSET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",  # a constructor argument, so it is saved with the tokenizer
    )
    return tok


assert set(string.digits) <= set(CHARSET)
