"""Streamed data and max_steps (issue 28): token-budget steps inside a seeded buffer, the run's length from
max_steps, exact resume from the stream position, a shard per process under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models import StopAtForward, TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.data import PlanSettings
from utils.training.data import batch_source

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)


def _lines(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _listed(plan):
    return [[(ex.input_ids.tolist(), c) for ex, c in m] for m in plan]


class Reiterable:
    """Any iterable of examples without a length (not a datasets object): iterating starts over."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


def InterruptingLM(stop_at=None):  # noqa: N802
    """Dropout on (so the restored RNG matters); raises KeyboardInterrupt at a chosen training forward."""
    return StopAtForward(TinyCausalLM(vocab_size=VOCAB, dropout=0.1), stop_at)


def _fit(model, train, out, **keywords):
    settings = dict(batch_size=4, learning_rate=3e-3, progress=False, save_plots=False, output_dir=str(out))
    return test_fine_tuning(model, CONFIG, train, _lines(12, seed=9), **dict(settings, **keywords))


def test_max_steps_stops_map_style_data_and_sets_the_schedule(tmp_path):
    torch.manual_seed(0)
    rows = _lines(40)  # 10 steps of 4 lines per epoch
    result = _fit(TinyCausalLM(vocab_size=VOCAB), rows, tmp_path, max_steps=25, n_epochs=1, shuffle=True,
                  group_by_length="lines", lr_schedule="linear", warmup_ratio=0.0)
    assert result["global_step"] == 25 and result["epochs_completed"] == 3  # max_steps overrides n_epochs
    rates = result["steps_summary"]["train/learning_rate"].tolist()
    assert rates == pytest.approx([3e-3 * (1 - k / 25) for k in range(25)])  # linear decay over the 25 steps


@pytest.mark.parametrize("form", ["datasets", "iterable"])
def test_streamed_steps_hold_a_token_budget_and_cover_the_stream_once(form):
    rows = _lines(300, seed=1)
    if form == "datasets":
        datasets = pytest.importorskip("datasets")
        stream = datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=3)
    else:
        stream = Reiterable(rows)
    source = batch_source(stream, PAD, buffer_size=64)
    spec = PlanSettings(8, shuffle=True, group_by_length="tokens", seed=3, accumulation=2)
    micro = list(source.plan(spec, epoch=0))
    steps = [micro[k:k + 2] for k in range(0, len(micro), 2)]
    seen = sorted(tuple(ex.input_ids.tolist()) for m in micro for ex, counts in m if counts)
    order = [tuple(r) for r in (rows if form == "iterable" else [list(x["input_ids"]) for x in stream])]
    assert seen == sorted(order)  # every example once
    budget = round(8 * 2 * sum(map(len, rows[:64])) / 64)  # the first buffer's mean length
    for step in steps:
        lengths = [len(ex) for m in step for ex, counts in m if counts]
        assert max(lengths) * len(lengths) <= budget or len(lengths) == 1
    again = list(source.plan(spec, epoch=0))
    assert _listed(again) == _listed(micro)
    other = [[ex.input_ids.tolist() for ex, _ in m] for m in source.plan(spec, epoch=1)]
    assert other != [[ex.input_ids.tolist() for ex, _ in m] for m in micro]  # each epoch shuffles anew
    # A buffer, not a full pass: the first step is formed before the stream is read to its end.
    reads = []
    lazy = batch_source(type("Counted", (), {"__iter__": lambda self: (reads.append(1) or r for r in rows)})(), PAD,
                        buffer_size=64)
    next(iter(lazy.plan(spec, 0)))
    assert len(reads) <= 64


def test_a_stream_needs_max_steps_and_a_one_shot_generator_is_refused(tmp_path):
    with pytest.raises(TypeError, match="has no length.*max_steps"):
        _fit(TinyCausalLM(vocab_size=VOCAB), Reiterable(_lines(20)), tmp_path)
    with pytest.raises(TypeError, match="one-shot iterator"):
        _fit(TinyCausalLM(vocab_size=VOCAB), (r for r in _lines(20)), tmp_path, max_steps=3)


@pytest.mark.parametrize("form", ["datasets", "iterable"])
def test_an_interrupted_stream_resumes_exactly(tmp_path, form):
    rows = _lines(60, seed=4)  # about 15 steps per epoch: the run crosses an epoch end
    if form == "datasets":
        datasets = pytest.importorskip("datasets")
        make = lambda: datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=2)  # noqa: E731
    else:
        make = lambda: Reiterable(rows)  # noqa: E731
    keywords = dict(max_steps=24, checkpoint_every=4, keep_checkpoints=3, stream_buffer_size=32)
    torch.manual_seed(0)
    whole_model = InterruptingLM()
    whole = _fit(whole_model, make(), tmp_path / "whole", **keywords)
    torch.manual_seed(0)
    interrupted = _fit(InterruptingLM(stop_at=19), make(), tmp_path / "cut", **keywords)  # step 19: after checkpoint 16
    assert interrupted["interrupted"] and interrupted["global_step"] == 18
    torch.manual_seed(1)  # other initial weights: the checkpoint must replace them
    resumed_model = InterruptingLM()
    resumed = _fit(resumed_model, make(), tmp_path / "cut", resume_from_checkpoint=True, **keywords)
    assert resumed["resumed_from_step"] == 16 and resumed["global_step"] == 24
    assert whole["epochs_completed"] >= 2
    assert resumed["loss_history"] == whole["loss_history"]
    assert resumed["final_val_loss"] == whole["final_val_loss"]
    for (name, a), b in zip(whole_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_streamed_shards_under_torchrun(tmp_path):
    worker = Path(__file__).with_name("stream_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                           str(worker), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for form in ("datasets", "iterable"):
        ranks = [json.loads((tmp_path / f"{form}-rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 30  # the processes stopped together
        assert ranks[0]["loss_history"] == ranks[1]["loss_history"]
        # Each process read its own shard: together they trained each example of an epoch at most once.
        assert not set(ranks[0]["read"]) & set(ranks[1]["read"])
        assert sorted(ranks[0]["read"] + ranks[1]["read"]) == list(range(61))
        assert ranks[0]["epochs_completed"] >= 2  # the 61-example stream ended (unevenly split) more than once


def test_a_dataloader_over_an_iterable_dataset_is_streamed(tmp_path):
    rows = _lines(40, seed=5)

    class Lines(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter({"input_ids": torch.tensor(r)} for r in rows)

    def pad(batch):  # a user's collated, right-padded batches: the stream splits them back into examples
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.stack([torch.nn.functional.pad(b["input_ids"], (0, width - len(b["input_ids"]))) for b in batch])
        lengths = torch.tensor([[len(b["input_ids"])] for b in batch])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) < lengths).long()}

    source = batch_source(torch.utils.data.DataLoader(Lines(), batch_size=5, collate_fn=pad), PAD, buffer_size=16)
    seen = sorted(ex.input_ids.tolist() for m in source.plan(PlanSettings(4, shuffle=True), 0) for ex, c in m if c)
    assert seen == sorted(rows)  # padding removed by the mask, every line once
    torch.manual_seed(0)
    result = _fit(TinyCausalLM(vocab_size=VOCAB), torch.utils.data.DataLoader(Lines(), batch_size=None), tmp_path,
                  max_steps=3)
    assert result["global_step"] == 3
