"""A byte-level BPE tokenizer trained locally, GPT-2 style: ``<|endoftext|>`` is EOS and PAD and the LAST id."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

EOS = "<|endoftext|>"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TIER3_CACHE_DIR", Path.home() / ".cache" / "tier3-training-utilities"))


def train_bpe_tokenizer(texts, vocab_size: int = 4096, cache_dir: str | os.PathLike | None = None):
    """A ``PreTrainedTokenizerFast`` trained on ``texts``; cached on disk by content and vocab size.

    The pad id equals the eos id and is ``vocab_size - 1`` (as GPT-2's 50256), not 0, so pad detection
    and EOS-versus-padding handling are exercised the way real GPT-2 tokenizers exercise them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    digest = hashlib.sha256(("\n".join(texts) + f"|{vocab_size}").encode()).hexdigest()[:16]
    path = Path(cache_dir or default_cache_dir()) / f"bpe-{vocab_size}-{digest}.json"
    try:
        # Read, then parse: once open, the file's text stays whole even if another process removes or replaces
        # it (a cache cleared by hand, or a process renaming its copy into place) between a check and the read.
        cached = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        cached = None
    if cached is not None:
        tokenizer = Tokenizer.from_str(cached)
    else:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        tokenizer.add_special_tokens([EOS])  # added after training: it gets the last id
        path.parent.mkdir(parents=True, exist_ok=True)
        # One temporary name per process: two processes training the same tokenizer at once (a search in
        # parallel processes, two notebooks) each rename a whole file of their own into place.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tokenizer.save(str(tmp))
        os.replace(tmp, path)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                      unk_token=None, model_max_length=1024)
    return wrapped


def prepare_lm_dataset(texts, tokenizer, max_length: int = 128, append_eos: bool = True) -> list[dict]:
    """One example per line: ``input_ids`` (variable length, truncated to ``max_length``) and ``attention_mask``.

    With ``append_eos`` a line that fits ends with the EOS token; its attention mask is 1, so that EOS is
    learned as a real target even though it shares the pad id.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one input and one target), got {max_length}.")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    examples = []
    for ids in encoded:
        if append_eos and tokenizer.eos_token_id is not None and len(ids) < max_length:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        if len(ids) >= 2:
            examples.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return examples
