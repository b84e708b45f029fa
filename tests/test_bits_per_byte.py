"""Bits per byte (issue 46): the summed loss in nats over the real targets / ln 2 / the bytes those targets stand
for, from validation's own sums, equal to an independent per-line computation for the shipped byte-level BPE
tokenizer and for a tokenizer of single bytes."""
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from models import tiny_gpt2
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

VOCAB = 512
# Characters the tokenizer never saw together: byte-level BPE cuts them into tokens that are parts of one UTF-8
# character (each decodes alone to U+FFFD), the case a decoded-text byte count gets wrong.
RARE = ["In naïve café — Zürich 東京 😀 ü", "In Ελληνικά and 日本語 text ✓", "plain ascii line with some words"]
# float64 sums of float32 logits, batched (padding, another attention kernel shape) against one line at a time:
# the same bound tests/test_input_forms.py derives for the loss itself, which bits per byte only rescales.
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def shipped():
    train = load_wikitext("train", source="offline")
    tokenizer = train_bpe_tokenizer(train.lines[:400], vocab_size=VOCAB)
    fits = [line for line in load_wikitext("validation", source="offline").lines
            if len(tokenizer(line)["input_ids"]) < 127]  # whole lines: each ends with its EOS
    val_lines = fits[:24] + RARE
    return tokenizer, train.lines[400:440], val_lines


def _model(vocab_size, seed=0):
    return tiny_gpt2(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=128, seed=seed)


def _independent_bits_per_byte(model, lines):
    """Each line alone, no padding: sum of -log p(target) over its targets (F.cross_entropy in float64) / ln 2 /
    the UTF-8 bytes of the text the targets stand for (the line's text after its first token, EOS none)."""
    nats, text_bytes = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, target_bytes in lines:
            ids = torch.tensor(ids)[None]
            logits = model(input_ids=ids).logits
            nats += F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()
            text_bytes += target_bytes
    return nats / math.log(2) / text_bytes


def test_bits_per_byte_equals_an_independent_computation_for_the_shipped_bpe_tokenizer(shipped, tmp_path):
    tokenizer, train_lines, val_lines = shipped
    examples = prepare_lm_dataset(val_lines, tokenizer, max_length=128)
    assert len(examples) == len(val_lines)  # every line fits: each ends with its EOS
    lines, partial = [], 0
    for text, example in zip(val_lines, examples):
        ids = example["input_ids"]
        decode = lambda part: tokenizer.decode(part, skip_special_tokens=True,  # noqa: E731
                                               clean_up_tokenization_spaces=False)
        assert decode(ids) == text and "\ufffd" not in decode(ids[:1])  # lossless; the first token is whole
        # The targets stand for the line's bytes after its first token (the EOS for none).
        lines.append((ids, len(text.encode("utf-8")) - len(decode(ids[:1]).encode("utf-8"))))
        partial += sum("\ufffd" in decode([i]) for i in ids[1:])
    assert partial >= 5  # tokens holding part of a UTF-8 character are among the targets

    train = prepare_lm_dataset(train_lines, tokenizer, max_length=128)
    model = _model(len(tokenizer))
    result = test_fine_tuning(model, None, train, examples, n_epochs=1, batch_size=4, tokenizer=tokenizer,
                              output_dir=str(tmp_path), progress=False, save_plots=False)
    expected = _independent_bits_per_byte(model, lines)
    assert result["val_bits_per_byte"] == pytest.approx(expected, rel=RELATIVE)
    assert result["metrics_summary"]["val/bits_per_byte"].iloc[-1] == result["val_bits_per_byte"]
    written = pd.read_csv(result["metrics_csv"])["val/bits_per_byte"].iloc[-1]  # the metrics CSV, as README says
    assert written == pytest.approx(result["val_bits_per_byte"], rel=1e-12)
    # The ratio to the loss is the targets' tokens per byte / ln 2, nothing else.
    n_targets = sum(len(ids) - 1 for ids, _ in lines)
    assert result["val_bits_per_byte"] == pytest.approx(
        result["final_val_loss"] * n_targets / math.log(2) / sum(b for _, b in lines), rel=1e-12)
    evaluated = evaluate_perplexity(model, examples, batch_size=5, tokenizer=tokenizer)
    assert evaluated["bits_per_byte"] == pytest.approx(expected, rel=RELATIVE)


class ByteTokenizer:
    """Ids 0-255 are the bytes of the UTF-8 text, 256 is EOS and PAD: the byte-level tokenizer of ByT5-style
    models, whose byte counts a caller passes as ``token_bytes``."""

    eos_token_id = pad_token_id = 256
    token_bytes = [1] * 256 + [0]

    def encode(self, text):
        return list(text.encode("utf-8")) + [self.eos_token_id]


def test_bits_per_byte_equals_an_independent_computation_for_a_byte_tokenizer(shipped, tmp_path, monkeypatch):
    from wandb_reader import history_and_config

    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _, train_lines, val_lines = shipped
    tokenizer = ByteTokenizer()
    train = [tokenizer.encode(text)[:96] for text in train_lines]
    val = [tokenizer.encode(text) for text in val_lines if len(text.encode("utf-8")) < 127]
    assert len(val) >= 10
    model = _model(257)
    model.config.pad_token_id = tokenizer.pad_token_id
    result = test_fine_tuning(model, None, train, val, n_epochs=1, batch_size=4, token_bytes=tokenizer.token_bytes,
                              output_dir=str(tmp_path), progress=False, save_plots=False, use_wandb=True,
                              wandb_mode="offline", eval_every=3)
    # Every target but the EOS is one byte: the bytes are the line's bytes after its first.
    expected = _independent_bits_per_byte(model, [(ids, len(ids) - 2) for ids in val])
    assert result["val_bits_per_byte"] == pytest.approx(expected, rel=RELATIVE)
    rows, _ = history_and_config(next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")))
    logged = [float(row["val/bits_per_byte"]) for row in rows if "val/bits_per_byte" in row]
    assert len(logged) >= 2 and logged[-1] == pytest.approx(result["val_bits_per_byte"], rel=1e-12)  # eval_every too


def test_without_a_tokenizer_there_are_no_bits_per_byte_and_bad_byte_counts_are_refused(tmp_path):
    lines = [list(range(1, 12)), list(range(3, 20)), list(range(2, 9))] * 3
    model = _model(64)
    model.config.pad_token_id = 0
    result = test_fine_tuning(model, None, lines, lines[:3], n_epochs=1, output_dir=str(tmp_path), progress=False,
                              save_plots=False)
    assert result["val_bits_per_byte"] is None and "val/bits_per_byte" not in result["metrics_summary"]
    for bad in ([], [1, -1], [1.5, 2], "abc"):
        with pytest.raises(ValueError, match="token_bytes must be"):
            test_fine_tuning(model, None, lines, lines[:3], n_epochs=1, token_bytes=bad,
                             output_dir=str(tmp_path / "bad"), progress=False, save_plots=False)


def test_a_search_can_minimise_bits_per_byte(shipped, tmp_path):
    from utils.tier3_training_utilities import test_hyperparameter_search

    tokenizer, train_lines, val_lines = shipped
    train = prepare_lm_dataset(train_lines[:16], tokenizer, max_length=128)
    val = prepare_lm_dataset(val_lines[:8], tokenizer, max_length=128)
    result = test_hyperparameter_search(lambda: _model(len(tokenizer)), None, train, val, n_trials=2,
                                        objectives="bits_per_byte",
                                        search_space={"learning_rate": ("log", 1e-4, 1e-2)}, tokenizer=tokenizer,
                                        output_dir=str(tmp_path), progress=False)
    trials = result["trials"]
    assert result["objectives"] == ("val_bits_per_byte",) and list(trials["state"]) == ["COMPLETE", "COMPLETE"]
    assert list(trials["value"]) == list(trials["val_bits_per_byte"])  # the objective is the trial's bits per byte
    assert result["best_value"] == trials["val_bits_per_byte"].min()
    # Bits per byte over the same validation text is the loss rescaled by one constant (tokens / bytes / ln 2).
    ratios = trials["val_bits_per_byte"] / trials["val_loss"]
    assert ratios.iloc[0] == pytest.approx(ratios.iloc[1], rel=1e-12)


def test_validation_computes_each_batchs_shifted_targets_once_with_bits_per_byte(shipped):
    """The loss and the bytes come from one computation of the batch's targets (on the device, no host read):
    counted by Python's own profiler hook on the real functions during validation, nothing replaced."""
    import sys

    from utils.training import evaluation
    from utils.training.loss import masked

    tokenizer, _, val_lines = shipped
    examples = prepare_lm_dataset(val_lines[:10], tokenizer, max_length=128)
    model = _model(len(tokenizer))
    watched = {evaluation.evaluate.__code__: "validation", masked.shifted_targets.__code__: "targets",
               type(model).forward.__code__: "forwards"}
    counts, depth = {"targets": 0, "forwards": 0}, []

    def profile(frame, event, _arg):
        name = watched.get(frame.f_code) if event in ("call", "return") else None  # not C calls made from them
        if name == "validation":
            depth.append(1) if event == "call" else depth.pop()
        elif name and depth and event == "call":
            counts[name] += 1

    sys.setprofile(profile)
    try:
        result = evaluate_perplexity(model, examples, batch_size=3, tokenizer=tokenizer)
    finally:
        sys.setprofile(None)
    assert result["bits_per_byte"] is not None
    assert counts["forwards"] == 4 and counts["targets"] == counts["forwards"], counts  # 10 lines, batches of 3
