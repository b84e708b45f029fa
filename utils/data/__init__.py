"""Real text offline: a Wikipedia corpus, a locally trained GPT-2-style tokenizer, LM examples."""
from .corpus import TextSplit, load_wikitext
from .tokenizer import prepare_lm_dataset, train_bpe_tokenizer

__all__ = ["TextSplit", "load_wikitext", "prepare_lm_dataset", "train_bpe_tokenizer"]
