"""WikiText-2 when the datasets hub is reachable; otherwise real Wikipedia articles shipped in gensim.

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
import warnings
from dataclasses import dataclass

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


def load_wikitext(split: str = "train", source: str = "auto", min_words: int = 5) -> TextSplit:
    """Lines of ``split`` ('train', 'validation', 'test').

    ``source``: 'auto' tries WikiText-2 through ``datasets`` and falls back to the offline excerpt;
    'hub' requires WikiText-2; 'offline' never touches the network. ``result.source`` says which was used.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {SPLITS}.")
    if source not in ("auto", "hub", "offline"):
        raise ValueError(f"Unknown source {source!r}; choose 'auto', 'hub' or 'offline'.")
    if source != "offline" and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            return _load_from_hub(split, min_words)
        except Exception as error:  # noqa: BLE001 - no datasets package, no network, no hub
            if source == "hub":
                raise
            if not _warned_unreachable:
                _warned_unreachable.append(True)  # once per process: every split and call would repeat it
                warnings.warn(f"WikiText-2 is not reachable ({type(error).__name__}: {error}); using the offline Wikipedia "
                              "excerpt shipped with gensim instead. To use WikiText-2, install the [hub] extra "
                              "(pip install 'tier3-training-utilities[hub]', which adds `datasets`) on a machine that "
                              "reaches the Hugging Face hub.", UserWarning, stacklevel=2)
    return TextSplit(list(_offline_splits(min_words)[split]), OFFLINE_SOURCE, split)


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
