"""Nothing silently wrong at the edges (issue 25): one test per case a hostile user found, named by its number."""
import math
import multiprocessing
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from models import StopAtForward, TinyCausalLM, random_lines, tiny_gpt2
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning
from utils.training.checkpoints import checkpoint as ckpt
from utils.training.data import PlanSettings
from utils.training.data import Example, PaddingCollator
from utils.training.checkpoints import OutputDirLock
from utils.training.data import ExampleBatches

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)


_data = random_lines


TRAIN, VAL = _data(), _data(8, seed=1)


def _model(**kwargs):
    torch.manual_seed(0)
    return TinyCausalLM(vocab_size=VOCAB, **kwargs)


def _run(output_dir, model=None, **kwargs):
    options = dict(n_epochs=2, batch_size=4, progress=False, save_plots=False, output_dir=str(output_dir))
    return test_fine_tuning(model or _model(), kwargs.pop("config", CONFIG), kwargs.pop("train", TRAIN),
                            kwargs.pop("val", VAL), **dict(options, **kwargs))


def _flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # same size, still loadable
    path.write_bytes(bytes(raw))


def _padded_dicts(lines, width):
    return [{"input_ids": torch.cat([t, torch.full((width - len(t),), PAD)]),
             "attention_mask": torch.cat([torch.ones(len(t)), torch.zeros(width - len(t))]).long()} for t in lines]


# Silent wrong numbers or weights -------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [-1, -8, 0])
def test_01_evaluate_perplexity_refuses_a_batch_size_below_one(batch_size):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_perplexity(_model(), VAL, CONFIG, batch_size=batch_size)


class NanAfterTraining(nn.Module):
    """Finite until it has trained ``finite_steps`` forwards; then every evaluation returns NaN logits."""

    def __init__(self, finite_steps):
        super().__init__()
        self.lm, self.finite_steps, self.trained = _model(), finite_steps, 0

    def forward(self, idx):
        logits = self.lm(idx)
        if self.training:
            self.trained += 1
        elif self.trained > self.finite_steps:
            logits = logits * math.nan
        return logits


def test_02_nan_validation_is_never_best_and_stops_the_run(tmp_path):
    steps_in_epoch_1 = math.ceil(len(TRAIN) / 4)
    model = NanAfterTraining(finite_steps=steps_in_epoch_1)
    result = _run(tmp_path, model=model, n_epochs=4, shuffle=False, load_best_model_at_end=True,
                  early_stopping_patience=3)
    assert result["best_epoch"] == 1 and math.isfinite(result["best_val_loss"])
    assert result["non_finite"] and result["outcome"].kind.value == "non_finite"
    assert "epoch 2" in result["stop_reason"] and result["epochs_completed"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_03_learning_rate_infinite_in_float32_is_refused_before_any_step(tmp_path):
    with pytest.raises(ValueError, match="learning_rate must be finite in float32"):
        _run(tmp_path, learning_rate=1e39)


def _loader(lines, shuffle, batch_size=4):
    width = max(len(t) for t in lines)
    return DataLoader(_padded_dicts(lines, width), batch_size=batch_size, shuffle=shuffle)


def InterruptAt(at=None):  # noqa: N802
    """Dropout on; a Ctrl-C at training forward ``at`` (the checkpoints written before it stay)."""
    return StopAtForward(_model(dropout=0.1), at)


def test_04_a_shuffled_dataloader_resumes_to_the_uninterrupted_run(tmp_path):
    settings = dict(n_epochs=2, checkpoint_every=2, learning_rate=3e-3)
    full_model = InterruptAt()
    full = _run(tmp_path / "full", model=full_model, train=_loader(TRAIN, shuffle=True), **settings)
    cut = _run(tmp_path / "cut", model=InterruptAt(at=9), train=_loader(TRAIN, shuffle=True), **settings)
    assert cut["interrupted"] and cut["global_step"] == 8  # 6 steps an epoch: interrupted inside epoch 2
    resumed_model = InterruptAt()
    resumed = _run(tmp_path / "cut", model=resumed_model, train=_loader(TRAIN, shuffle=True),
                   resume_from_checkpoint=True, **settings)
    assert resumed["resumed_from_step"] == 8
    assert resumed["loss_history"] == full["loss_history"]
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_05_the_token_budget_plan_does_not_change_with_the_padding_multiple():
    examples = [Example(t) for t in _data(200, seed=3, high=90)]
    spec = PlanSettings(batch_size=8, shuffle=True, group_by_length="tokens", seed=1, accumulation=2)
    exact = ExampleBatches(examples, PaddingCollator(PAD)).plan(spec, epoch=1)
    bounded = ExampleBatches(examples, PaddingCollator(PAD, pad_to_multiple_of=64)).plan(spec, epoch=1)
    assert exact == bounded


def test_06_eos_padding_without_a_mask_is_warned_naming_attention_mask(tmp_path):
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=PAD)
    padded = [torch.cat([t, torch.full((22 - len(t),), PAD)]) for t in TRAIN]
    with pytest.warns(UserWarning, match="also the EOS id.*attention_mask"):
        _run(tmp_path, config=config, train=padded, n_epochs=1)


def test_07_a_dataloader_whose_later_batches_differ_is_refused_on_resume(tmp_path):
    settings = dict(n_epochs=2, checkpoint_every=2, shuffle=False)
    _run(tmp_path, model=InterruptAt(at=5), train=_loader(TRAIN, shuffle=False), **settings)
    other = TRAIN[:4] + list(reversed(TRAIN[4:]))  # the same first batch, other batches after it
    with pytest.raises(ValueError, match="batch 2 of this epoch .* differs"):
        _run(tmp_path, model=InterruptAt(), train=_loader(other, shuffle=False), resume_from_checkpoint=True,
             **settings)


def test_07_a_validation_dataloader_is_fingerprinted_whole(tmp_path):
    settings = dict(n_epochs=2, checkpoint_every=2)
    _run(tmp_path, model=InterruptAt(at=5), val=_loader(VAL, shuffle=False), **settings)
    other = VAL[:4] + list(reversed(VAL[4:]))
    with pytest.raises(ValueError, match="different validation data"):
        _run(tmp_path, model=InterruptAt(), val=_loader(other, shuffle=False), resume_from_checkpoint=True, **settings)


def test_08_padding_and_sequence_counts_leave_out_the_non_counting_repeats(tmp_path):
    equal = _data(10, seed=4, low=12, high=13)  # every line 12 tokens: no padding anywhere
    result = _run(tmp_path, train=equal, n_epochs=1, batch_size=1, gradient_accumulation_steps=4)
    epoch = result["metrics_summary"].iloc[0]
    assert epoch["train/padded_tokens"] == 0 and epoch["train/pad_fraction"] == 0
    assert result["samples_per_second"] * result["training_time_seconds"] == pytest.approx(10)


def test_09_resuming_with_fewer_epochs_than_the_checkpoint_is_refused(tmp_path):
    _run(tmp_path, n_epochs=3, checkpoint_every=100, keep_checkpoints=3, load_best_model_at_end=True)
    with pytest.raises(ValueError, match="past n_epochs=2"):
        _run(tmp_path, n_epochs=2, checkpoint_every=100, keep_checkpoints=3, resume_from_checkpoint=True)


# Lost checkpoints or blocked runs ------------------------------------------------------------------------------
def test_10_a_damaged_checkpoint_never_holds_the_only_kept_slot(tmp_path):
    first = _run(tmp_path, model=InterruptAt(), n_epochs=1, checkpoint_every=2, keep_checkpoints=1)
    _flip_a_bit(Path(first["last_checkpoint"]) / "model.pt")
    with pytest.warns(UserWarning, match="Skipping checkpoint"):  # nothing intact: starts fresh, then is killed
        second = _run(tmp_path, model=InterruptAt(at=3), n_epochs=1, checkpoint_every=2, keep_checkpoints=1,
                      resume_from_checkpoint=True)
    assert second["interrupted"] and second["global_step"] == 2
    folders = ckpt.step_folders(tmp_path / "checkpoints")
    assert [f.name for f in folders] == ["step-2"]  # the new checkpoint kept, the damaged one gone
    ckpt.verify_folder(folders[0])  # intact: raises if not


def test_11_an_empty_run_json_is_recovered_with_a_warning(tmp_path):
    _run(tmp_path, n_epochs=1, checkpoint_every=3)
    (tmp_path / "run.json").write_text("")  # what a kill during the old non-atomic write left
    with pytest.warns(UserWarning, match="run.json is damaged"):
        result = _run(tmp_path, n_epochs=2, checkpoint_every=3, resume_from_checkpoint=True)
    assert result["epochs_completed"] == 2 and (tmp_path / "run.json").read_text().startswith("{")
    assert not list(tmp_path.glob(".run.json.*"))  # no temp file left behind


def test_12_ctrl_c_while_plots_are_written_still_returns_the_results(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("utils.training.metrics.plots.save_training_plots", interrupted)  # a Ctrl-C arriving in savefig
    with pytest.warns(UserWarning, match="Interrupted while writing the plots"):
        result = _run(tmp_path, n_epochs=1, save_plots=True)
    assert result["unfinished_outputs"] == ["the plots"] and result["plot_paths"] == {}
    assert result["epochs_completed"] == 1 and (tmp_path / "metrics_epochs.csv").exists()


def test_13_a_damaged_best_folder_is_skipped_with_a_warning(tmp_path):
    _run(tmp_path, n_epochs=1, checkpoint_every=2, load_best_model_at_end=True)
    _flip_a_bit(tmp_path / "checkpoints" / "best" / "model.pt")
    with pytest.warns(UserWarning, match=r"Skipping .*best: it is damaged"):
        result = _run(tmp_path, n_epochs=2, checkpoint_every=2, load_best_model_at_end=True,
                      resume_from_checkpoint=True)
    assert result["epochs_completed"] == 2


def _take(folder, barrier, results):
    barrier.wait()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lock = OutputDirLock(Path(folder)).__enter__()
        results.put("held")
        barrier.wait()  # hold it until both have tried
        lock.__exit__(None, None, None)
    except RuntimeError:
        results.put("refused")
        barrier.wait()


def test_14_two_processes_finding_one_stale_lock_never_both_hold_it(tmp_path):
    context = multiprocessing.get_context("fork")
    dead = context.Process(target=lambda: None)
    dead.start()
    dead.join()
    for round_ in range(10):
        folder = tmp_path / f"round-{round_}"
        folder.mkdir()
        (folder / ".lock").write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}"}}')
        barrier, results = context.Barrier(2), context.Queue()
        workers = [context.Process(target=_take, args=(str(folder), barrier, results)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in workers)
        assert outcomes == ["held", "refused"], f"round {round_}: {outcomes}"


# Unclear or late errors ----------------------------------------------------------------------------------------
def test_15_evaluate_perplexity_names_a_sequence_longer_than_the_positions():
    model = tiny_gpt2(vocab_size=VOCAB, n_positions=16, pad_token_id=PAD)
    with pytest.raises(ValueError, match="Example 1 of the evaluation data has 20 tokens.*16 positions"):
        evaluate_perplexity(model, [torch.arange(1, 9), torch.arange(1, 21)])


def test_16_a_val_fraction_leaving_no_training_example_is_named(tmp_path):
    with pytest.raises(ValueError, match="val_fraction=0.99 of 12 examples.*none to train on"):
        _run(tmp_path, train=TRAIN[:12], val=None, val_fraction=0.99)


class CountingLM(TinyCausalLM):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(vocab_size=VOCAB, max_len=16)
        self.training_forwards = 0

    def forward(self, idx):
        self.training_forwards += int(self.training)
        return super().forward(idx)


def test_17_an_overlong_validation_loader_batch_is_named_before_training(tmp_path):
    model = CountingLM()
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD, n_positions=16)
    val = _loader([torch.arange(1, 9)] * 4 + [torch.arange(1, 21)], shuffle=False)  # the 2nd batch is 20 wide
    with pytest.raises(ValueError, match="A batch of the validation data has 20 tokens"):
        _run(tmp_path, model=model, config=config, train=[t[:15] for t in TRAIN], val=val)
    assert model.training_forwards == 0


def test_18_a_dataloader_over_an_iterable_dataset_needs_max_steps_and_says_so(tmp_path):
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(_padded_dicts(TRAIN, 20))

    with pytest.raises(TypeError, match="has no length .*IterableDataset.*pass max_steps=N"):
        _run(tmp_path, train=DataLoader(Stream(), batch_size=4))
    result = _run(tmp_path, train=DataLoader(Stream(), batch_size=4), max_steps=5)  # streamed (issue 28)
    assert result["global_step"] == 5


def test_19_settings_and_inputs_with_unclear_errors_are_named(tmp_path):
    with pytest.raises(ValueError, match="random_seed must be <= 2\\*\\*32 - 1"):
        _run(tmp_path, random_seed=2**32)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            _run(tmp_path, device="cuda")
    with pytest.raises(ValueError, match="has no parameters"):
        _run(tmp_path, model=nn.Identity())
    with pytest.raises(TypeError, match="attention_mask holds floats .*a mask must hold 0 and 1"):
        _run(tmp_path, train=[{"input_ids": t, "attention_mask": torch.full((len(t),), 0.5)} for t in TRAIN])


def test_19_a_float_mask_of_zeros_and_ones_equals_the_integer_mask():
    lines = _padded_dicts(VAL, 20)
    as_int = evaluate_perplexity(_model(), lines, CONFIG)
    as_float = evaluate_perplexity(_model(), [dict(x, attention_mask=x["attention_mask"].float()) for x in lines],
                                   CONFIG)
    assert as_float["loss"] == as_int["loss"] and as_float["tokens"] == as_int["tokens"]


def test_20_evaluate_perplexity_restores_every_submodules_mode():
    model = _model(dropout=0.1)
    model.train()
    model.blocks.eval()  # a user froze one part in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    evaluate_perplexity(model, VAL, CONFIG)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_21_a_fallback_pad_id_that_is_a_real_token_is_warned(tmp_path):
    char_config = SimpleNamespace(vocab_size=VOCAB)  # no pad id anywhere: falls back to 0
    with_spaces = [torch.cat([t[:3], torch.zeros(1, dtype=torch.long), t[3:]]) for t in TRAIN]
    with pytest.warns(UserWarning, match="token 0 occurs inside the training sequences"):
        _run(tmp_path, config=char_config, train=with_spaces, n_epochs=1)
