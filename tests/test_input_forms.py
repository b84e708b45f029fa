"""The same text gives the same numbers however it arrives: right- or left-padded dicts, plain lists,
DataLoaders of left-padded batches, plain GPT-2-style lists ending in EOS; malformed input is named (issue 17)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models import TinyCausalLM, tiny_gpt2
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning
from utils.training.loss import IGNORE_INDEX, shifted_targets

VOCAB, PAD = 50, 0
EOS = VOCAB - 1


def _lines(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, EOS, (int(torch.randint(2, 24, (1,), generator=g)),), generator=g) for _ in range(n)]


def _exact_loss(model, lines):
    """Independent reference: each line alone, no padding anywhere, summed cross-entropy / targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for line in lines:
            out = model(line[None])
            logits = out if isinstance(out, torch.Tensor) else out.logits
            total += F.cross_entropy(logits[0, :-1].double(), line[1:], reduction="sum").item()
            count += len(line) - 1
    return total / count


def _padded(lines, side, width=None):
    width = width or max(len(x) for x in lines)
    rows = []
    for line in lines:
        pad = (0, width - len(line)) if side == "right" else (width - len(line), 0)
        rows.append({"input_ids": F.pad(line, pad, value=PAD), "attention_mask": F.pad(torch.ones_like(line), pad)})
    return rows


def _models():
    torch.manual_seed(0)
    plain = TinyCausalLM(vocab_size=VOCAB).eval()
    hf = tiny_gpt2(vocab_size=VOCAB, pad_token_id=PAD).eval()
    return {"plain": (plain, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)), "hf": (hf, hf.config)}


@pytest.mark.parametrize("name", ["plain", "hf"])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_left_right_and_unpadded_forms_give_the_exact_perplexity(name, batch_size):
    model, config = _models()[name]
    lines = _lines()
    exact = _exact_loss(model, lines)
    for form in (lines, _padded(lines, "right"), _padded(lines, "left")):
        result = evaluate_perplexity(model, form, config, batch_size=batch_size)
        assert result["loss"] == pytest.approx(exact, rel=1e-6)
        assert result["tokens"] == sum(len(x) - 1 for x in lines)


@pytest.mark.parametrize("name", ["plain", "hf"])
def test_dataloader_of_left_padded_batches_is_exact_at_any_batch_size(name):
    model, config = _models()[name]
    lines = _lines(14, seed=1)
    exact = _exact_loss(model, lines)
    for batch_size in (1, 7):
        # Per-batch left padding, as a tokenizer with padding_side="left" produces it.
        batches = [_padded(lines[i:i + batch_size], "left") for i in range(0, len(lines), batch_size)]
        loader = DataLoader(batches, batch_size=None,
                            collate_fn=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]})
        assert evaluate_perplexity(model, loader, config)["loss"] == pytest.approx(exact, rel=1e-6)


def test_left_padded_training_equals_right_padded_training():
    lines, val = _lines(16, seed=2), _lines(6, seed=3)

    def train(form):
        torch.manual_seed(0)
        model = TinyCausalLM(vocab_size=VOCAB)
        result = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), form, val, n_epochs=1,
                                  batch_size=4, learning_rate=3e-3, shuffle=False, group_by_length=False,
                                  progress=False, save_plots=False)
        return model, result

    reference_model, reference = train(lines)
    for form in (_padded(lines, "left"), DataLoader(_padded(lines, "left"), batch_size=4)):
        model, result = train(form)
        assert result["loss_history"] == pytest.approx(reference["loss_history"], rel=1e-5)
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_plain_gpt2_style_lines_ending_in_eos_count_their_eos():
    # pad == eos, as in GPT-2 and this package's tokenizer: the line's own EOS is a real target.
    model = tiny_gpt2(vocab_size=VOCAB, pad_token_id=EOS).eval()
    lines = [torch.cat([x, torch.tensor([EOS])]) for x in _lines(10, seed=4)]
    result = evaluate_perplexity(model, [x.tolist() for x in lines], model.config, batch_size=4)
    assert result["tokens"] == sum(len(x) - 1 for x in lines)
    assert result["loss"] == pytest.approx(_exact_loss(model, lines), rel=1e-6)
    # The same lines with extra trailing pad ids: the first EOS counts, the rest is padding.
    padded = [torch.cat([x, torch.tensor([EOS, EOS])]).tolist() for x in lines]
    assert (evaluate_perplexity(model, padded, model.config, batch_size=4)["loss"]
            == pytest.approx(result["loss"], rel=1e-6))


def test_the_rule_for_plain_lists():
    # Seed scenario 1: [50, 23, 12, 0, 0] with pad 0 has 3 real tokens (2 targets).
    assert shifted_targets(torch.tensor([[50, 23, 12, 0, 0]]), pad_token_id=0)[0].tolist() == [23, 12, -100, -100]
    # An interior pad id is a real token.
    assert shifted_targets(torch.tensor([[5, 0, 7]]), pad_token_id=0)[0].tolist() == [0, 7]
    # pad == eos: the first of the trailing run is the real EOS.
    assert (shifted_targets(torch.tensor([[5, 6, 9, 9]]), pad_token_id=9, pad_is_eos=True)[0].tolist()
            == [6, 9, IGNORE_INDEX])
    # With a mask, a target predicted from a padding position does not count (left padding).
    targets = shifted_targets(torch.tensor([[0, 0, 5, 6]]), attention_mask=torch.tensor([[0, 0, 1, 1]]))
    assert targets[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 6]


MALFORMED = {
    "empty example": ([[1, 2, 3], []], ValueError, "Example 1: the sequence is empty"),
    "columns of different lengths": ({"input_ids": [[1, 2, 3], [4, 5, 6]], "attention_mask": [[1, 1, 1]]}, ValueError,
                                     "'attention_mask' column has 1 rows but 'input_ids' has 2"),
    "loader of tensors": (DataLoader([torch.tensor([1, 2, 3])] * 4, batch_size=2), TypeError, "yields Tensor batches"),
    "loader with a short mask": (
        DataLoader([{"input_ids": torch.tensor([1, 2, 3]), "attention_mask": torch.tensor([1, 1])}] * 2, batch_size=2,
                   collate_fn=lambda rows: {"input_ids": torch.stack([r["input_ids"] for r in rows]),
                                            "attention_mask": torch.stack([r["attention_mask"] for r in rows])}),
        ValueError, "attention_mask of shape"),
    "empty loader": (DataLoader([], batch_size=2), ValueError, "yields no batch"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_named_before_any_step(case):
    data, error, message = MALFORMED[case]
    torch.manual_seed(0)
    with pytest.raises(error, match=message):
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), data,
                         [[1, 2, 3]], n_epochs=1, progress=False, save_plots=False)
