"""Where the pad id comes from: config, then tokenizer, then a warned fallback."""
from __future__ import annotations

import warnings
import weakref

from ..warn import caller_stacklevel

FALLBACK_MESSAGE = "No pad_token_id found in config/tokenizer, defaulting to 0"


def _int_attr(obj, name):
    value = getattr(obj, name, None) if obj is not None else None
    # Some tokenizers report a list of eos ids; the first is the canonical one.
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return None if value is None else int(value)


_warned: dict[tuple, list] = {}  # (kind, id(config), id(tokenizer)) -> references to those two objects


def _first_warning(kind: str, config, tokenizer) -> bool:
    """Whether this (config, tokenizer) has not yet had this warning in this process (a search asks once per trial).

    Keyed on identity: a weak reference where the object allows one, else a strong one, so that an id is
    never reused by another object while its entry stands. A call with neither object warns every time.
    """
    objects = [o for o in (config, tokenizer) if o is not None]
    if not objects:
        return True
    key = (kind, id(config), id(tokenizer))
    held = _warned.get(key)
    if held is not None and all((r() if isinstance(r, weakref.ref) else r) is o for r, o in zip(held, objects)):
        return False
    refs = []
    for obj in objects:
        try:
            refs.append(weakref.ref(obj))
        except TypeError:  # SimpleNamespace, object(): hold them (configs are small)
            refs.append(obj)
    _warned[key] = refs
    return True


def detect_pad_token_id(config, tokenizer=None) -> tuple[int, str]:
    """Return ``(pad_token_id, source)``; ``source`` says where it was found (for logs and W&B).

    Order: ``config.pad_token_id`` -> tokenizer (argument, else ``config.tokenizer``)
    ``.pad_token_id`` -> tokenizer ``.eos_token_id`` (GPT-2 convention, warned) -> 0 (warned).
    ``None`` values are skipped and missing attributes never raise.
    """
    pad = _int_attr(config, "pad_token_id")
    if pad is not None:
        return pad, "config.pad_token_id"
    if tokenizer is None:
        tokenizer = getattr(config, "tokenizer", None) if config is not None else None
    pad = _int_attr(tokenizer, "pad_token_id")
    if pad is not None:
        return pad, "tokenizer.pad_token_id"
    eos = _int_attr(tokenizer, "eos_token_id")
    if eos is not None:
        if not _first_warning("eos", config, tokenizer):
            return eos, "tokenizer.eos_token_id"
        warnings.warn(
            f"The tokenizer has no pad_token_id; using its eos_token_id ({eos}) as the pad id "
            "(the GPT-2 convention). Set tokenizer.pad_token or config.pad_token_id to choose another.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
        return eos, "tokenizer.eos_token_id"
    if not _first_warning("zero", config, tokenizer):
        return 0, "default 0"
    # Printed as well as warned: notebooks and callers' tests read it from stdout.
    print(FALLBACK_MESSAGE, flush=True)
    warnings.warn(
        f"{FALLBACK_MESSAGE}. If token 0 is a real token of your vocabulary, set config.pad_token_id "
        "(or tokenizer.pad_token_id) to your pad id.",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )
    return 0, "default 0"


def pad_is_eos(pad_token_id: int, config, tokenizer=None) -> bool:
    """Whether the pad id is also the EOS id (GPT-2's convention): then a line's final pad id may be its real EOS."""
    if tokenizer is None:
        tokenizer = getattr(config, "tokenizer", None) if config is not None else None
    eos_ids = {_int_attr(config, "eos_token_id"), _int_attr(tokenizer, "eos_token_id")} - {None}
    return pad_token_id in eos_ids
