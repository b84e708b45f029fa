"""How many bytes of text each token id stands for: the denominator of bits per byte.

Bits per byte = (summed cross-entropy in nats over the real targets) / ln 2 / (the bytes those targets stand for).
Unlike perplexity it does not depend on how the text was cut into tokens, so models with other tokenizers compare.
The bytes of a token are its raw bytes, not its decoded text: a byte-level BPE token may hold part of a UTF-8
character (decoding it alone gives U+FFFD, three bytes), and a byte-fallback token ``<0xE2>`` is one byte. Special
tokens (EOS, PAD, ...) stand for no text: 0 bytes (their targets' nats still count, see README).
"""
from __future__ import annotations

import json
import math
import re
import weakref

import torch

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_METASPACE = "\u2581"  # SentencePiece's word-start mark, one space in the text


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each of the 256 byte values is shown as one printable character (printable
    Latin-1 bytes as themselves, the others as code points from 256 on, in byte order). char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            shown[chr(byte)] = byte
        else:
            shown[chr(256 + extra)] = byte
            extra += 1
    return shown


BYTE_LEVEL_ALPHABET = _byte_level_alphabet()
_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _decoder_types(spec) -> set[str]:
    """Every decoder type named in a ``tokenizers`` JSON decoder spec (a Sequence lists its parts)."""
    if not isinstance(spec, dict):
        return set()
    found = {spec.get("type")}
    for part in spec.get("decoders") or []:
        found |= _decoder_types(part)
    if spec.get("type") == "Replace" and (spec.get("pattern") or {}).get("String") == _METASPACE:
        found.add("Metaspace")
    return found


def _token_length(token: str, byte_level: bool, byte_fallback: bool, metaspace: bool, wordpiece: bool) -> int:
    if byte_fallback and _BYTE_FALLBACK.fullmatch(token):
        return 1
    if byte_level and all(char in BYTE_LEVEL_ALPHABET for char in token):
        return len(token)  # one shown character per raw byte
    if wordpiece and token.startswith("##"):
        token = token[2:]
    if metaspace:
        token = token.replace(_METASPACE, " ")
    return len(token.encode("utf-8"))


def _lengths_from_tokenizer(tokenizer) -> list[int] | None:
    """Per id, the bytes of text the token stands for; None when the tokenizer does not say what its tokens are."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and type(tokenizer).__module__.startswith("tokenizers"):
        backend = tokenizer  # a tokenizers.Tokenizer itself
    if backend is not None:
        types = _decoder_types(json.loads(backend.to_str()).get("decoder"))
        vocabulary = backend.get_vocab(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        special = {i for i, token in added.items() if getattr(token, "special", False)}
        plain_added = {i for i in added if i not in special}  # user-added words: their text, not byte-level symbols
        flags = ("ByteLevel" in types, "ByteFallback" in types, "Metaspace" in types, "WordPiece" in types)
    elif callable(getattr(tokenizer, "get_vocab", None)) and getattr(tokenizer, "byte_decoder", None) is not None:
        vocabulary = tokenizer.get_vocab()  # a slow byte-level tokenizer (transformers' GPT2Tokenizer)
        special, plain_added = set(getattr(tokenizer, "all_special_ids", ()) or ()), set()
        flags = (True, False, False, False)
    else:
        return None
    special |= set(getattr(tokenizer, "all_special_ids", ()) or ())
    lengths = [0] * (max(vocabulary.values(), default=-1) + 1)
    for token, index in vocabulary.items():
        if index in special:
            continue
        lengths[index] = (len(token.encode("utf-8")) if index in plain_added
                          else _token_length(token, *flags))
    return lengths


def token_byte_lengths(tokenizer) -> list[int] | None:
    """Bytes per token id of ``tokenizer`` (computed once per tokenizer object), or None when unknown."""
    if tokenizer is None:
        return None
    try:
        return _cache[tokenizer]
    except (KeyError, TypeError):  # TypeError: not weak-referenceable, computed each time
        pass
    lengths = _lengths_from_tokenizer(tokenizer)
    try:
        _cache[tokenizer] = lengths
    except TypeError:
        pass
    return lengths


def check_token_bytes(token_bytes) -> list[int]:
    """A caller's per-token byte counts: a sequence of non-negative ints indexed by token id."""
    values = token_bytes.tolist() if isinstance(token_bytes, torch.Tensor) else token_bytes
    try:
        values = list(values)
    except TypeError:
        values = None
    if (not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)):
        raise ValueError("token_bytes must be a non-empty sequence of non-negative ints, one per token id (the UTF-8 "
                         "bytes each token stands for, 0 for special tokens), e.g. [len(t) for t in byte_tokens].")
    return values


def byte_lengths_tensor(tokenizer, token_bytes, vocab_size: int | None, device) -> torch.Tensor | None:
    """Bytes per id as an int64 tensor on ``device`` covering the model's ids (ids beyond the tokenizer: 0), from
    ``token_bytes`` when given, else from the tokenizer; None when neither says."""
    lengths = check_token_bytes(token_bytes) if token_bytes is not None else token_byte_lengths(tokenizer)
    if lengths is None:
        return None
    size = max(len(lengths), int(vocab_size or 0))
    return torch.tensor(lengths + [0] * (size - len(lengths)), dtype=torch.int64, device=device)


def bits_per_byte(loss_sum: float, target_bytes: float) -> float | None:
    """Summed nats / ln 2 / bytes; None when no target stood for any byte."""
    return float(loss_sum) / math.log(2) / float(target_bytes) if target_bytes > 0 else None
