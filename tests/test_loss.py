"""The one masked loss: which targets count, gradients, NaN-safety (issue 2, scenarios 1, 2, 4, 8)."""
import torch
import torch.nn.functional as F

from utils.training.data import Example, PaddingCollator
from utils.training.loss import IGNORE_INDEX, masked_lm_loss, shifted_targets


def _logits(batch, seq, vocab, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, seq, vocab, requires_grad=True)


def test_padded_batch_counts_only_real_targets_and_padding_gets_zero_gradient():
    ids = torch.tensor([[50, 23, 12, 0, 0]])
    logits = _logits(1, 5, 64)
    stats = masked_lm_loss(logits, ids, pad_token_id=0)
    expected = F.cross_entropy(logits[0, :2], torch.tensor([23, 12]), reduction="sum")
    assert int(stats.real_targets) == 2
    torch.testing.assert_close(stats.loss_sum, expected)
    stats.loss_sum.backward()
    assert torch.all(logits.grad[0, 2:] == 0)  # positions that predict padding, and the last one
    assert torch.all(logits.grad[0, :2].abs().sum(-1) > 0)


def test_same_rule_through_the_collator_and_attention_mask():
    collated = PaddingCollator(pad_token_id=0)([(Example(torch.tensor([50, 23, 12])), True),
                                                (Example(torch.tensor([7, 8, 9, 10, 11])), True)])
    assert collated["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    logits = _logits(2, 5, 64)
    stats = masked_lm_loss(logits, collated["input_ids"], collated["labels"], collated["attention_mask"], 0)
    expected = F.cross_entropy(logits[0, :2], torch.tensor([23, 12]), reduction="sum") + F.cross_entropy(
        logits[1, :4], torch.tensor([8, 9, 10, 11]), reduction="sum")
    assert int(stats.real_targets) == 6
    torch.testing.assert_close(stats.loss_sum, expected)


def test_no_padding_equals_plain_cross_entropy():
    ids = torch.tensor([[50, 23, 12, 8, 7]])
    logits = _logits(1, 5, 64)
    stats = masked_lm_loss(logits, ids, pad_token_id=0)
    plain = F.cross_entropy(logits[0, :-1], ids[0, 1:])  # mean over the 4 shifted targets
    torch.testing.assert_close(stats.loss_sum / stats.real_targets, plain)
    assert int(stats.real_targets) == 4


def test_gpt2_style_pad_id_50256_is_masked():
    pad = 50256
    ids = torch.tensor([[464, 3290, 318, pad, pad], [1212, 318, 257, 1332, 13]])
    logits = _logits(2, 5, 50257)
    stats = masked_lm_loss(logits, ids, pad_token_id=pad)
    expected = (F.cross_entropy(logits[0, :2], ids[0, 1:3], reduction="sum")
                + F.cross_entropy(logits[1, :4], ids[1, 1:], reduction="sum"))
    assert int(stats.real_targets) == 6
    torch.testing.assert_close(stats.loss_sum, expected)


def test_real_eos_sharing_the_pad_id_counts_when_a_mask_says_it_is_real():
    eos = 63
    example = Example(torch.tensor([5, 6, 7, eos]), attention_mask=torch.tensor([1, 1, 1, 1]))
    collated = PaddingCollator(pad_token_id=eos)([(example, True),
                                                  (Example(torch.tensor([9, 10, 11, 12, 13, 14])), True)])
    targets = shifted_targets(collated["input_ids"], collated["labels"], collated["attention_mask"], eos)
    assert targets[0].tolist() == [6, 7, eos, IGNORE_INDEX, IGNORE_INDEX]  # real EOS learned, padding ignored
    # Without a mask (plain sequence) the pad-id rule applies, and the EOS is not a target.
    assert shifted_targets(torch.tensor([[5, 6, 7, eos]]), pad_token_id=eos)[0].tolist() == [6, 7, IGNORE_INDEX]


def test_labels_minus_100_are_excluded():
    ids = torch.tensor([[1, 2, 3, 4]])
    labels = torch.tensor([[-100, -100, 3, 4]])
    logits = _logits(1, 4, 8)
    stats = masked_lm_loss(logits, ids, labels, torch.ones_like(ids), 0)
    torch.testing.assert_close(stats.loss_sum, F.cross_entropy(logits[0, 1:3], torch.tensor([3, 4]), reduction="sum"))


def test_all_padding_batch_is_zero_not_nan():
    ids = torch.zeros(2, 6, dtype=torch.long)
    logits = _logits(2, 6, 16)
    stats = masked_lm_loss(logits, ids, pad_token_id=0)
    assert int(stats.real_targets) == 0 and stats.loss_sum.item() == 0.0
    stats.loss_sum.backward()
    assert torch.all(logits.grad == 0) and torch.isfinite(logits.grad).all()


def test_accuracy_counts_real_targets_only():
    ids = torch.tensor([[1, 2, 3, 0]])
    logits = torch.full((1, 4, 8), -10.0)
    logits[0, 0, 2] = logits[0, 1, 5] = logits[0, 2, 0] = 10.0  # right, wrong, "right" on a pad target
    stats = masked_lm_loss(logits, ids, pad_token_id=0)
    assert int(stats.correct) == 1 and int(stats.real_targets) == 2
