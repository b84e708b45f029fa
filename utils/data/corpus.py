"""Real Wikipedia text shipped in gensim (offline, the default), or WikiText-2 from the datasets hub when asked.

The offline source is the English Wikipedia dump excerpt in gensim's test data (about 100 articles,
480k words). Wiki markup is stripped with gensim's ``filter_wiki``; the text is split into
paragraph lines like WikiText's, and whole articles are assigned to the splits deterministically,
so validation and test text never shares an article with training.
"""
from __future__ import annotations

import bz2
import functools
import os
import re
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from ..training.warn import caller_stacklevel

SPLITS = ("train", "validation", "test")
GENSIM_EXCERPT = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
OFFLINE_SOURCE = f"gensim test data: {GENSIM_EXCERPT}"
HUB_SOURCE = "datasets: wikitext / wikitext-2-raw-v1"
_warned_unreachable: list[bool] = []


@dataclass
class TextSplit:
    """Lines of one split and where they came from."""

    lines: list[str]
    source: str
    split: str

    def __len__(self) -> int:
        return len(self.lines)

    def __iter__(self):
        return iter(self.lines)

    def __getitem__(self, index):
        return self.lines[index]


def load_wikitext(split: str = "train", source: str = "offline", min_words: int = 5) -> TextSplit:
    """Lines of ``split`` ('train', 'validation', 'test').

    ``source``: 'offline' (the default) reads the Wikipedia excerpt shipped in gensim and never touches the
    network; 'hub' asks for WikiText-2 through ``datasets`` and raises one clear error when the hub cannot be
    reached; 'auto' takes WikiText-2 when the hub answers within a few seconds, else the offline excerpt (one
    warning per process). ``result.source`` says which was used.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if source not in ("auto", "hub", "offline"):
        raise ValueError(f"Unknown source {source!r}; choose 'offline' (shipped, no network), 'hub' or 'auto'.")
    if source == "offline":
        return TextSplit(list(_offline_splits(min_words)[split]), OFFLINE_SOURCE, split)
    unreachable = _hub_unreachable()
    if unreachable is None:
        try:
            return _load_from_hub(split, min_words)
        except Exception as error:  # noqa: BLE001 - no datasets package, or the hub failed after answering
            unreachable = f"{type(error).__name__}: {error}"
    if source == "hub":
        raise ConnectionError(f"WikiText-2 was asked for (source='hub') but cannot be had: {unreachable}. Use "
                              "source='offline' for the Wikipedia excerpt shipped with gensim, or run where the "
                              "Hugging Face hub is reachable (and `pip install datasets`).")
    if not _warned_unreachable:
        _warned_unreachable.append(True)  # once per process: every split and call would repeat it
        warnings.warn(f"WikiText-2 is not available ({unreachable}); using the offline Wikipedia excerpt shipped with "
                      "gensim instead (source='offline' says so without trying).",
                      UserWarning, stacklevel=caller_stacklevel())
    return TextSplit(list(_offline_splits(min_words)[split]), OFFLINE_SOURCE, split)


def _hub_unreachable(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be used, or None when it answers. One TCP connection with a short timeout: the hub
    client itself retries an unreachable host for about 25 s per call (five retries, 8 s apart)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
    try:
        import datasets  # noqa: F401
    except ImportError:
        return "the datasets package is not installed (pip install datasets)"
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return f"{host}:{port} is not reachable ({type(error).__name__})"
    return None


def _load_from_hub(split: str, min_words: int) -> TextSplit:
    from datasets import load_dataset

    rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    lines = [line.strip() for line in rows if len(line.split()) >= min_words and not line.strip().startswith("=")]
    return TextSplit(lines, HUB_SOURCE, split)


def _excerpt_path() -> str:
    import gensim

    path = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data", GENSIM_EXCERPT)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall gensim (pip install --force-reinstall gensim).")
    return path


def _clean_paragraphs(markup: str, min_words: int) -> list[str]:
    from gensim.corpora.wikicorpus import filter_wiki

    text = re.sub(r"'{2,}", "", filter_wiki(markup))  # bold/italic quote markup survives filter_wiki
    lines = []
    for raw in text.splitlines():
        line = " ".join(raw.split())
        # Headings, list bullets and table debris are not prose; WikiText keeps headings, we drop them.
        if line.startswith(("=", "*", "#", "|", "{", "!")) or len(line.split()) < min_words:
            continue
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=4)
def _offline_splits(min_words: int) -> dict[str, tuple[str, ...]]:
    from gensim.corpora.wikicorpus import extract_pages

    with bz2.open(_excerpt_path()) as handle:
        articles = [(title, text) for title, text, _ in extract_pages(handle, filter_namespaces=("0",))
                    if not text.lstrip().upper().startswith("#REDIRECT")]
    articles.sort(key=lambda article: article[0])
    splits = {name: [] for name in SPLITS}
    for index, (_, text) in enumerate(articles):
        # Every 10th article (in title order) to validation, the next to test: about 80/10/10 of articles.
        name = "validation" if index % 10 == 3 else "test" if index % 10 == 4 else "train"
        splits[name].extend(_clean_paragraphs(text, min_words))
    return {name: tuple(lines) for name, lines in splits.items()}
