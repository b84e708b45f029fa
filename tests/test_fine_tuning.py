"""test_fine_tuning / evaluate_perplexity end to end on tiny models (issue 2, scenarios 3, 6, 7, 8)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from models import TinyCausalLM
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

VOCAB, PAD = 50, 0


def _sequences(n, min_len, max_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(min_len, max_len + 1, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def _exact_loss(model, sequences):
    """Independent reference: each sequence alone (no padding anywhere), summed CE / real targets."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            logits = model(seq[None])
            total += F.cross_entropy(logits[0, :-1], seq[1:], reduction="sum").item()
            count += len(seq) - 1
    return total / count


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return TinyCausalLM(vocab_size=VOCAB, **kwargs).eval()


def test_perplexity_with_40_percent_padding_equals_exact_masked_evaluation():
    sequences = _sequences(30, 3, 40)
    model = _model()
    result = evaluate_perplexity(model, sequences, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), batch_size=6)
    exact = _exact_loss(model, sequences)
    assert result["tokens"] == sum(len(s) - 1 for s in sequences)
    assert result["loss"] == pytest.approx(exact, rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(exact), rel=1e-6)
    # Counting padding (what an unmasked loop does) gives another number on the same batches.
    batch = torch.nn.utils.rnn.pad_sequence(sequences[:6], batch_first=True, padding_value=PAD)
    pad_fraction = (batch[:, 1:] == PAD).float().mean().item()
    assert pad_fraction > 0.3
    with torch.no_grad():
        logits = model(batch)
    unmasked = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1)).item()
    masked = _exact_loss(model, sequences[:6])
    assert abs(unmasked - masked) > 0.05


def test_epoch_loss_is_token_weighted_not_mean_of_batch_means():
    # Batches of 2: one of two long sequences, one of two very short ones.
    sequences = [s for s in _sequences(2, 60, 60, seed=1)] + [s for s in _sequences(2, 3, 3, seed=2)]
    model = _model()
    result = evaluate_perplexity(model, sequences, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), batch_size=2)
    token_weighted = _exact_loss(model, sequences)
    mean_of_means = (_exact_loss(model, sequences[:2]) + _exact_loss(model, sequences[2:])) / 2
    assert result["loss"] == pytest.approx(token_weighted, rel=1e-6)
    assert abs(result["loss"] - mean_of_means) > 1e-3


def test_training_loss_of_an_epoch_is_token_weighted_over_its_steps():
    # learning_rate=0: the weights never move, so the epoch's training loss must equal the independent
    # per-sequence evaluation of the training data, and each step's loss that of its own sequences.
    sequences = _sequences(24, 2, 50, seed=3)
    model = _model()
    result = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), sequences[:16],
                              sequences[16:], n_epochs=1, batch_size=4, learning_rate=0.0, shuffle=False,
                              group_by_length=False, progress=False, save_plots=False)
    row = result["metrics_summary"].iloc[0]
    assert row["train/loss_excl_padding"] == pytest.approx(_exact_loss(model, sequences[:16]), rel=1e-6)
    assert result["loss_history"] == pytest.approx([_exact_loss(model, sequences[i:i + 4]) for i in range(0, 16, 4)],
                                                   rel=1e-6)
    mean_of_step_means = sum(result["loss_history"]) / len(result["loss_history"])
    assert abs(row["train/loss_excl_padding"] - mean_of_step_means) > 1e-4
    assert row["train/real_tokens"] == sum(len(s) - 1 for s in sequences[:16])
    assert result["final_val_loss"] == pytest.approx(row["val/loss_excl_padding"])
    assert result["val_perplexity"] == pytest.approx(math.exp(result["final_val_loss"]))


def _train_on(train_data, val_data):
    model = _model(seed=5).train()
    result = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), train_data, val_data,
                              n_epochs=2, batch_size=4, learning_rate=3e-3, shuffle=False, group_by_length=False,
                              progress=False, save_plots=False, lr_schedule="constant", warmup_ratio=0.0)
    return model, result


def test_padding_form_has_no_effect_on_learning():
    sequences = _sequences(16, 2, 30, seed=4)
    val = _sequences(6, 2, 30, seed=6)
    width = 32
    prepadded_masked = [{"input_ids": F.pad(s, (0, width - len(s)), value=PAD),
                         "attention_mask": F.pad(torch.ones_like(s), (0, width - len(s)))} for s in sequences]
    prepadded_plain = [F.pad(s, (0, width - len(s)), value=PAD).tolist() for s in sequences]
    # A DataLoader of dict batches padded to a fixed width: the model really sees the extra padding columns.
    loader = DataLoader(prepadded_masked, batch_size=4, shuffle=False)

    reference_model, reference = _train_on(sequences, val)
    for form in (prepadded_masked, prepadded_plain, loader):
        model, result = _train_on(form, val)
        assert result["loss_history"] == pytest.approx(reference["loss_history"], rel=1e-5)
        assert result["final_val_loss"] == pytest.approx(reference["final_val_loss"], rel=1e-5)
        for p, q in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_all_padding_example_keeps_every_metric_finite():
    sequences = _sequences(12, 3, 20, seed=7) + [torch.zeros(10, dtype=torch.long)]
    with pytest.warns(UserWarning, match="no real"):
        result = test_fine_tuning(_model().train(), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), sequences,
                                  [torch.zeros(5, dtype=torch.long), torch.tensor([3, 4, 5])], n_epochs=1, batch_size=4,
                                  progress=False, save_plots=False)
    row = result["metrics_summary"].iloc[0]
    numbers = [row[c] for c in ("train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity",
                                 "train/accuracy_excl_padding", "val/accuracy_excl_padding")]
    assert all(math.isfinite(v) for v in numbers + result["loss_history"])


def test_default_synthetic_data_runs_and_is_announced():
    with pytest.warns(UserWarning, match="SYNTHETIC"):
        result = test_fine_tuning(_model().train(), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), n_epochs=1,
                                  batch_size=16, learning_rate=1e-3, progress=False, save_plots=False)
    assert set(result["metrics_summary"].columns) >= {"epoch", "train/loss_excl_padding", "val/loss_excl_padding",
                                                       "val/perplexity", "train/accuracy_excl_padding",
                                                       "val/accuracy_excl_padding", "learning_rate",
                                                       "train/real_tokens", "train/padded_tokens"}
    assert result["pad_token_id"] == PAD and len(result["loss_history"]) == result["global_step"]


def test_hugging_face_model_gets_attention_mask_and_trains():
    from models import tiny_gpt2

    model = tiny_gpt2(vocab_size=VOCAB, pad_token_id=PAD)
    masks = []
    model.register_forward_pre_hook(lambda module, args, kwargs: masks.append(kwargs.get("attention_mask")),
                                    with_kwargs=True)
    sequences = _sequences(12, 2, 30, seed=8)
    before = evaluate_perplexity(model, sequences, batch_size=4)
    result = test_fine_tuning(model, model.config, sequences, sequences, n_epochs=3, batch_size=4, learning_rate=3e-3,
                              progress=False, save_plots=False)
    assert result["final_val_loss"] < before["loss"]
    assert result["pad_token_id_source"] == "config.pad_token_id"
    assert masks and all(m is not None for m in masks)
    assert any(bool((m == 0).any()) for m in masks)  # padded batches arrive with their mask


def test_torch_dataset_of_dicts_is_accepted():
    class Lines(torch.utils.data.Dataset):
        def __init__(self, sequences):
            self.sequences = sequences

        def __len__(self):
            return len(self.sequences)

        def __getitem__(self, index):
            return {"input_ids": self.sequences[index], "attention_mask": torch.ones_like(self.sequences[index])}

    sequences = _sequences(12, 2, 20, seed=9)
    model = _model()
    as_dataset = evaluate_perplexity(model, Lines(sequences), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD),
                                     batch_size=4)
    assert as_dataset["loss"] == pytest.approx(_exact_loss(model, sequences), rel=1e-6)
