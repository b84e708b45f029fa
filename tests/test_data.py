"""Batch planning: length grouping, determinism, sharding like DistributedSampler, dynamic padding (issue 8)."""
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch

from models import TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.data import PlanSettings, shard_batches
from utils.training.data import Example, PaddingCollator
from utils.training.data import ExampleBatches

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(2, 128) for _ in range(1000)]


def _source():
    return ExampleBatches([Example(torch.ones(n, dtype=torch.long)) for n in LENGTHS], PaddingCollator(0))


def _padding(plan):
    padded = real = 0
    for batch in plan:
        lengths = [LENGTHS[i] for i, _ in batch]
        padded += max(lengths) * len(lengths) - sum(lengths)
        real += sum(lengths)
    return padded / (padded + real)


def _plan(source, batch_size=None, *, epoch, **settings):
    return source.plan(PlanSettings(batch_size, **settings), epoch)


def test_length_grouping_cuts_padding_and_covers_every_example_once():
    source = _source()
    grouped = _plan(source, 16, shuffle=True, group_by_length=True, seed=1, epoch=0)
    shuffled = _plan(source, 16, shuffle=True, group_by_length=False, seed=1, epoch=0)
    assert sorted(i for b in grouped for i, _ in b) == list(range(len(LENGTHS)))
    assert _padding(grouped) < 0.05 < 0.3 < _padding(shuffled)


def test_order_is_deterministic_per_seed_and_epoch():
    source = _source()
    plan = lambda seed, epoch: _plan(source, 8, shuffle=True, group_by_length=True, seed=seed, epoch=epoch)  # noqa: E731
    assert plan(3, 0) == plan(3, 0)
    assert plan(3, 0) != plan(3, 1) and plan(3, 0) != plan(4, 0)


def test_sharding_matches_distributed_sampler_and_marks_repeats():
    order = list(range(11))
    ranks = [shard_batches(order, 2, world_size=3, rank=r) for r in range(3)]
    assert [i for b in ranks[0] for i, _ in b] == [0, 3, 6, 9]
    assert [i for b in ranks[1] for i, _ in b] == [1, 4, 7, 10]
    assert [i for b in ranks[2] for i, _ in b] == [2, 5, 8, 0]  # DistributedSampler repeats index 0 ...
    assert [c for b in ranks[2] for _, c in b] == [True, True, True, False]  # ... and that repeat does not count


@pytest.mark.parametrize("grouping", ["lines", "tokens"])
def test_grouping_keeps_whole_optimizer_steps_together(grouping):
    # The same examples form each optimizer step however it is split into micro-batches and processes.
    source = _source()
    plan = lambda **split: _plan(source, shuffle=True, group_by_length=grouping, seed=0, epoch=0, **split)  # noqa: E731

    def steps(micro_batches_per_rank, per_step):
        """Sorted example indices of each optimizer step, gathered over the ranks' micro-batches."""
        n_steps = math.ceil(len(micro_batches_per_rank[0]) / per_step)
        return [sorted(i for rank in micro_batches_per_rank for batch in rank[k * per_step:(k + 1) * per_step]
                       for i, counts in batch if counts) for k in range(n_steps)]

    whole = steps([plan(batch_size=16)], 1)
    assert steps([plan(batch_size=8, accumulation=2)], 2) == whole
    assert steps([plan(batch_size=4, accumulation=2, world_size=2, rank=r) for r in (0, 1)], 2) == whole


def test_collator_pads_to_a_multiple():
    batch = PaddingCollator(pad_token_id=99, pad_to_multiple_of=8)([(Example(torch.arange(1, 10)), True)])
    assert batch["input_ids"].shape == (1, 16) and batch["attention_mask"].sum() == 9
    assert (batch["input_ids"][0, 9:] == 99).all() and (batch["labels"][0, 9:] == -100).all()


def test_pad_to_multiple_of_does_not_change_the_loss():
    data = [torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(n)) for n in range(2, 40)]

    def train(multiple):
        torch.manual_seed(0)
        # Fixed-line batches: with token budgets the multiple would (rightly) change which lines share a step.
        return test_fine_tuning(TinyCausalLM(vocab_size=50), SimpleNamespace(vocab_size=50, pad_token_id=0), data,
                                data[:10], n_epochs=1, batch_size=4, pad_to_multiple_of=multiple,
                                group_by_length="lines", progress=False, save_plots=False)

    exact, padded = train(None), train(8)
    assert (padded["metrics_summary"]["train/pad_fraction"].iloc[0]
            > exact["metrics_summary"]["train/pad_fraction"].iloc[0])
    assert padded["loss_history"] == pytest.approx(exact["loss_history"], rel=1e-5)
    assert padded["final_val_loss"] == pytest.approx(exact["final_val_loss"], rel=1e-5)


def test_token_budget_steps_respect_the_budget_and_cover_every_example_once():
    source = _source()
    budget = 16 * sum(LENGTHS) // len(LENGTHS)
    for accumulation in (1, 2):
        plan = _plan(source, 16 // accumulation, shuffle=True, group_by_length="tokens", seed=3, epoch=1,
                           accumulation=accumulation, max_tokens_per_batch=budget // accumulation)
        steps = [plan[i:i + accumulation] for i in range(0, len(plan), accumulation)]
        for step in steps:
            indices = [i for batch in step for i, counts in batch if counts]
            padded = max(LENGTHS[i] for i in indices) * len(indices)
            assert padded <= budget or len(indices) == 1  # only a single over-long line may exceed it
        assert sorted(i for b in plan for i, counts in b if counts) == list(range(len(LENGTHS)))
        assert plan == _plan(source, 16 // accumulation, shuffle=True, group_by_length="tokens", seed=3, epoch=1,
                                   accumulation=accumulation, max_tokens_per_batch=budget // accumulation)


def test_token_steps_hold_similar_token_counts():
    source = _source()
    real = lambda plan: torch.tensor([float(sum(LENGTHS[i] for i, _ in b)) for b in plan])  # noqa: E731
    tokens = real(_plan(source, 16, shuffle=True, group_by_length="tokens", seed=0, epoch=0))
    lines = real(_plan(source, 16, shuffle=True, group_by_length="lines", seed=0, epoch=0))
    assert tokens.std() < 0.5 * lines.std()
    assert abs(tokens.mean() / lines.mean() - 1) < 0.15  # the mean step is about batch_size lines


def test_shuffle_false_trains_in_the_given_order():
    """Defaults with shuffle=False equal a bare loop over consecutive batches of the given order."""
    from utils.training.data import to_examples
    from utils.training.loss import masked_lm_loss

    g = torch.Generator().manual_seed(5)
    data = [torch.randint(1, 50, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g) for _ in range(22)]
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=50).double()
    test_fine_tuning(model, SimpleNamespace(vocab_size=50, pad_token_id=0), data, data[:4], n_epochs=1, batch_size=4,
                     shuffle=False, learning_rate=1e-2, lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
                     max_grad_norm=None, progress=False, save_plots=False)
    torch.manual_seed(0)
    bare = TinyCausalLM(vocab_size=50).double()
    optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-2, weight_decay=0.0)
    examples, collate = to_examples(data, 0), PaddingCollator(0)
    for start in range(0, len(examples), 4):
        batch = collate([(ex, True) for ex in examples[start:start + 4]])
        sums = masked_lm_loss(bare(batch["input_ids"]), batch["input_ids"], batch["labels"], batch["attention_mask"], 0)
        (sums.loss_sum / sums.real_targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    for p, q in zip(model.parameters(), bare.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


_TRAIN_AT_ONCE = """
import os, pathlib, sys, time
from utils.data import train_bpe_tokenizer
cache = pathlib.Path(sys.argv[1])
lines = [f"line {i} of a text that {i % 7} processes train one tokenizer on" for i in range(20)]
(cache.parent / f"ready-{os.getpid()}").touch()
while len(list(cache.parent.glob("ready-*"))) < 3:  # all three start training together
    time.sleep(0.01)
for _ in range(300):  # the same tokenizer again and again: every call trains, saves and renames it into place
    for cached in cache.glob("bpe-*.json"):
        cached.unlink(missing_ok=True)
    train_bpe_tokenizer(lines, vocab_size=270, cache_dir=cache)
"""


def test_processes_training_the_same_tokenizer_at_once_all_succeed(tmp_path):
    """A search in parallel processes (or two notebooks) trains one tokenizer in each: the cache must not fail one
    of them. With one shared temporary name, a process renamed the file another was writing (FileNotFoundError)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_AT_ONCE, str(tmp_path / "cache")], cwd=root,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(errors)
