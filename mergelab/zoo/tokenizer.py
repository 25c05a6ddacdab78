"""The zoo's tokenizer: one token per character of the skills' alphabet, plus special tokens.

Built offline with the `tokenizers` library (a WordLevel vocabulary over single characters)
and wrapped as a `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained` loads it like
any Hugging Face tokenizer. Encoding prepends `<bos>`; decoding joins characters back.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
ALPHABET = string.ascii_lowercase + string.digits + " +,=?"
MAX_LENGTH = 64  # tokens; every zoo prompt + answer fits with room to spare


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over `ALPHABET` that adds `<bos>` in front of every text."""
    vocab = {tok: i for i, tok in enumerate([*SPECIAL, *ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char, one token
    core.decoder = decoders.Fuse()  # join tokens with no separator
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MAX_LENGTH,
        padding_side="right",
    )
