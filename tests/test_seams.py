"""Where the parts written in parallel meet: regressions an independent review of the merged change found."""
from types import SimpleNamespace

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from models import TinyCausalLM, random_lines
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning
from utils.training.data import LoaderBatches, batch_source

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)


def test_a_fixed_size_list_arrow_column_equals_the_same_lists():
    rows = [[i % 40 + 1, (i * 3) % 40 + 1, (i * 7) % 40 + 1, (i * 11) % 40 + 1] for i in range(40)]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64"), length=4)})
    dataset = datasets.Dataset.from_dict({"input_ids": rows}, features=features)
    torch.manual_seed(0)
    from_arrow = evaluate_perplexity(TinyCausalLM(vocab_size=VOCAB), dataset, CONFIG)
    torch.manual_seed(0)
    from_lists = evaluate_perplexity(TinyCausalLM(vocab_size=VOCAB), rows, CONFIG)
    assert from_arrow["loss"] == from_lists["loss"] and from_arrow["tokens"] == from_lists["tokens"] == 120


def test_an_arrow_fingerprint_follows_the_content_not_datasets_own_fingerprint():
    rows = {"input_ids": [t.tolist() for t in random_lines(30, seed=2)]}
    first, second = datasets.Dataset.from_dict(rows), datasets.Dataset.from_dict(rows)
    second._fingerprint = "a-random-one"  # what datasets assigns when a map function cannot be hashed
    other = datasets.Dataset.from_dict({"input_ids": rows["input_ids"][::-1]})
    fingerprint = lambda data: batch_source(data, PAD).fingerprint()  # noqa: E731
    assert fingerprint(first) == fingerprint(second) != fingerprint(other)


def test_a_shuffling_loaders_fingerprint_moves_no_random_state():
    lines = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in random_lines(16, low=6, high=7)]
    generator = torch.Generator().manual_seed(5)
    loader = DataLoader(lines, batch_size=4, shuffle=True, generator=generator)
    source = LoaderBatches(loader, PAD)
    torch.manual_seed(1)
    first = source.fingerprint()
    after_global, after_generator = torch.rand(1), torch.rand(1, generator=generator)
    torch.manual_seed(7)
    assert source.fingerprint() == first  # taken at another moment: the same
    torch.manual_seed(1)
    generator.manual_seed(5)
    assert torch.equal(torch.rand(1), after_global) and torch.equal(torch.rand(1, generator=generator), after_generator)


class RunsDry:
    """Iterable without a length that is empty once it has been read to its end ``passes`` times (a reader that
    stops rewinding, or an empty shard)."""

    def __init__(self, lines, passes):
        self.lines, self.passes = lines, passes

    def __iter__(self):
        if self.passes <= 0:
            return
        yield from self.lines
        self.passes -= 1


def test_a_stream_that_yields_nothing_on_its_second_pass_is_named_not_looped(tmp_path):
    lines = random_lines(24, seed=3)
    # Start-up reads it to its end once (the fingerprint), epoch 1 once; before, epoch 2 looped forever.
    with pytest.raises(ValueError, match="yielded no optimizer step in epoch 2"):
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, RunsDry(lines, passes=2), lines[:6], max_steps=1000,
                         batch_size=4, progress=False, save_plots=False, output_dir=str(tmp_path))


def test_step_rows_appended_across_epochs_equal_the_results_and_the_history_file(tmp_path):
    import json

    import pandas as pd

    result = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, random_lines(24), random_lines(6, seed=1),
                              n_epochs=3, batch_size=4, eval_every=4, progress=False, save_plots=False,
                              output_dir=str(tmp_path))
    on_disk = pd.read_csv(tmp_path / "metrics_steps.csv")
    assert len(on_disk) == result["global_step"] == len(result["steps_summary"])
    assert on_disk["train/step_loss_excl_padding"].tolist() == pytest.approx(result["loss_history"], rel=1e-12)
    history = json.loads((tmp_path / "metrics_history.json").read_text())
    assert len(history["steps"]) == result["global_step"] and len(history["epochs"]) == 3


def test_gradient_clip_norm_is_the_same_setting_in_the_search_and_echoed_in_the_settings(tmp_path):
    from utils.tier3_training_utilities import test_hyperparameter_search

    lines = random_lines(16)
    result = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, lines, lines[:4], n_epochs=1,
                              gradient_clip_norm=0.5, progress=False, save_plots=False,
                              output_dir=str(tmp_path / "run"))
    assert result["settings"]["max_grad_norm"] == 0.5 and result["settings"]["gradient_clip_norm"] == 0.5
    search = test_hyperparameter_search(lambda: TinyCausalLM(vocab_size=VOCAB), CONFIG, lines, lines[:4], n_trials=1,
                                        search_space={"learning_rate": ("log", 1e-4, 1e-3)}, gradient_clip_norm=0.5,
                                        progress=False, output_dir=str(tmp_path / "search"))
    assert search["trials"]["state"].tolist() == ["COMPLETE"]


def test_an_empty_stream_is_named_empty_and_start_up_opens_a_stream_once(tmp_path):
    with pytest.raises(ValueError, match="yields no row at all"):
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, RunsDry([], passes=5), random_lines(6), max_steps=3,
                         batch_size=4, progress=False, save_plots=False, output_dir=str(tmp_path / "empty"))
    lines = random_lines(24, seed=3)
    opened = []

    class Counted(RunsDry):
        def __iter__(self):
            opened.append(1)
            return super().__iter__()

    test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), CONFIG, Counted(lines, passes=9), lines[:6], max_steps=3,
                     batch_size=4, progress=False, save_plots=False, output_dir=str(tmp_path / "counted"))
    # The start-up probes share one read of the stream's head; then epoch 1 (3 steps fit in it).
    assert len(opened) <= 3, len(opened)
