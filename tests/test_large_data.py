"""Corpora larger than memory (issue 28): plans over one numpy array of lengths equal the earlier list code bit
for bit; token lists and Arrow Datasets are read per batch, never materialised; ``max_steps``."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DistributedSampler

from models import TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.data import MEGA_BATCH_FACTOR, PlanSettings
from utils.training.data import Example, PaddingCollator
from utils.training.data import ExampleBatches, batch_source

VOCAB, PAD = 50, 0


# -- the list-based plan code before issue 28, kept as the reference the numpy plans must equal -----------------
def _old_length_grouped(order, lengths, step_size, generator, shuffle_batches):
    mega = step_size * MEGA_BATCH_FACTOR
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i:i + step_size] for i in range(0, len(chunk), step_size)]
    full, tail = (batches[:-1], batches[-1:]) if len(batches[-1]) < step_size else (batches, [])
    if shuffle_batches:
        full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return [i for batch in full + tail for i in batch]


def _old_epoch_order(lengths, step_size, *, shuffle, group_by_length, seed, epoch):
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    if group_by_length:
        order = _old_length_grouped(order, lengths, step_size, generator, shuffle_batches=shuffle)
    return order


def _old_token_budget_steps(lengths, *, step_budget, micro_batches_per_step, examples_per_mega_batch, shuffle, seed,
                            epoch):
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist() if shuffle else list(range(len(lengths)))
    steps = []
    for start in range(0, len(order), examples_per_mega_batch):
        current = []
        for index in sorted(order[start:start + examples_per_mega_batch], key=lambda i: -lengths[i]):
            if current and lengths[current[0]] * (len(current) + 1) > step_budget:
                steps.append(current)
                current = []
            current.append(index)
        steps.append(current)
    if shuffle:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    rows = lambda step: math.ceil(len(step) / micro_batches_per_step)  # noqa: E731
    return [[step[k * rows(step):(k + 1) * rows(step)] for k in range(micro_batches_per_step)] for step in steps]


def _old_shard_batches(order, batch_size, world_size=1, rank=0):
    positions = list(DistributedSampler(order, num_replicas=world_size, rank=rank, shuffle=False))
    slots = [(order[p], rank + k * world_size < len(order)) for k, p in enumerate(positions)]
    return [slots[i:i + batch_size] for i in range(0, len(slots), batch_size)]


def _old_plan(lengths, spec: PlanSettings, epoch):
    grouping = "tokens" if spec.group_by_length in ("auto", True) and (spec.shuffle or spec.group_by_length is True) \
        else (False if spec.group_by_length == "auto" else spec.group_by_length)
    if grouping == "tokens":
        per_step = spec.micro_batches_per_step
        budget = spec.max_tokens_per_batch * per_step if spec.max_tokens_per_batch else \
            max(1, round(spec.batch_size * per_step * sum(lengths) / len(lengths)))
        steps = _old_token_budget_steps(lengths, step_budget=budget, micro_batches_per_step=per_step,
                                        examples_per_mega_batch=spec.batch_size * per_step * MEGA_BATCH_FACTOR,
                                        shuffle=spec.shuffle, seed=spec.seed, epoch=epoch)
        a, r = spec.accumulation, spec.rank
        mine = [micro for step in steps for micro in step[r * a:(r + 1) * a]]
        return [[(i, True) for i in micro] if micro else [(steps[0][0][0], False)] for micro in mine]
    order = _old_epoch_order(lengths, spec.batch_size * spec.micro_batches_per_step, shuffle=spec.shuffle,
                             group_by_length=bool(grouping), seed=spec.seed, epoch=epoch)
    return _old_shard_batches(order, spec.batch_size, spec.world_size, spec.rank)


SPLITS = [dict(), dict(accumulation=2), dict(accumulation=3, world_size=2, rank=1), dict(world_size=3, rank=2)]


@pytest.mark.parametrize("n", [1, 7, 1000, 2345])
@pytest.mark.parametrize("grouping", ["auto", "tokens", "lines", False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_numpy_plans_equal_the_list_code(n, grouping, shuffle):
    rng = random.Random(n)
    lengths = [rng.choice([2, 3, 8, 8, 8, 40, 128, 300]) if n < 1000 else rng.randint(2, 200) for _ in range(n)]
    source = ExampleBatches([Example(torch.ones(k, dtype=torch.long)) for k in lengths], PaddingCollator(0))
    for split in SPLITS:
        for extra in (dict(), dict(max_tokens_per_batch=150)):
            spec = PlanSettings(4, shuffle=shuffle, group_by_length=grouping, seed=n, **split, **extra)
            for epoch in (0, 3):
                assert list(source.plan(spec, epoch)) == _old_plan(lengths, spec, epoch), (split, extra, epoch)
    assert list(source.eval_plan(3, 2, 1)) == _old_shard_batches(sorted(range(n), key=lambda i: -lengths[i]), 3, 2, 1)


class CountingList(list):
    """A list that counts the rows read from it: the corpus must be read per batch, not up front."""

    reads = 0

    def __getitem__(self, index):
        CountingList.reads += 1
        return super().__getitem__(index)


def _lines(n, seed=0, low=2, high=24):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_token_lists_are_read_per_batch_and_cut_like_before():
    from utils.training.data import to_examples

    rows = _lines(300) + [[5, 6, 0, 0], [0, 0], [7]]  # trailing pads cut; all-pad and one-token rows skipped
    data = CountingList(rows)
    with pytest.warns(UserWarning, match="Skipped 2 of 303"):
        source = batch_source(data, PAD)
    CountingList.reads = 0
    batch = source.collate(source.plan(PlanSettings(8, shuffle=True, group_by_length="tokens"), 0)[0])
    assert CountingList.reads <= 8  # only the batch's rows
    with pytest.warns(UserWarning, match="Skipped 2 of 303"):
        eager = to_examples(rows, PAD)  # the earlier path: every example built up front
    assert source.lengths.tolist() == [len(ex) for ex in eager]
    every = source.collate([(i, True) for i in range(len(eager))])
    expected = PaddingCollator(PAD)([(ex, True) for ex in eager])
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(every[key], expected[key])
    assert batch["input_ids"].shape[0] >= 1


def test_a_bad_token_id_is_named_by_the_lazy_path_as_before():
    rows = _lines(100)
    rows[37] = rows[37][:-1] + [VOCAB + 3]
    with pytest.raises(ValueError, match=f"Example 37 of the training data holds token id {VOCAB + 3}"):
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), rows,
                         rows[:4], n_epochs=1, progress=False, save_plots=False)


def _train(train, val, **keywords):
    torch.manual_seed(0)
    settings = dict(n_epochs=2, batch_size=4, progress=False, save_plots=False, learning_rate=1e-3)
    return test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), train,
                            val, **dict(settings, **keywords))


@pytest.mark.parametrize("form", ["lists", "tensors", "examples_in_memory"])
def test_lazy_lists_give_the_results_of_the_in_memory_path_bit_for_bit(form):
    rows = _lines(120, seed=1)
    reference = _train([{"input_ids": r} for r in rows], None, val_fraction=0.25)  # dicts: built up front
    data = {"lists": rows, "tensors": [torch.tensor(r) for r in rows],
            "examples_in_memory": [{"input_ids": r} for r in rows]}[form]
    result = _train(data, None, val_fraction=0.25)
    assert result["loss_history"] == reference["loss_history"]
    assert result["final_val_loss"] == reference["final_val_loss"]


def test_an_arrow_dataset_is_read_lazily_and_equals_the_list_path(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _lines(150, seed=2)
    masks = [[1] * len(r) for r in rows]
    rows[3], masks[3] = [0, 0] + rows[3] + [0], [0, 0] + masks[3] + [0]  # left and right padding, by mask
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": masks})
    dataset.save_to_disk(str(tmp_path / "corpus"))
    stored = datasets.load_from_disk(str(tmp_path / "corpus"))
    listed = [{"input_ids": r, "attention_mask": m} for r, m in zip(rows, masks)]
    source = batch_source(stored, PAD)
    assert source.lengths.tolist() == batch_source(listed, PAD).lengths.tolist()
    assert _train(stored, None)["loss_history"] == _train(listed, None)["loss_history"]
    selected = stored.shuffle(seed=0).select(range(100))  # read through an indices mapping
    mapped = [listed[i] for i in selected._indices.column(0).to_pylist()]
    assert batch_source(selected, PAD).lengths.tolist() == batch_source(mapped, PAD).lengths.tolist()
    lazy = batch_source(selected, PAD)
    assert torch.equal(lazy.collate([(5, True)])["input_ids"],
                       batch_source(mapped, PAD).collate([(5, True)])["input_ids"])


def test_an_arrow_dataset_names_a_bad_id_and_fingerprints_without_reading_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _lines(60, seed=3)
    rows[41] = rows[41] + [VOCAB + 1]
    dataset = datasets.Dataset.from_dict({"input_ids": rows})
    with pytest.raises(ValueError, match=f"Example 41 of the training data holds token id {VOCAB + 1}"):
        _train(dataset, dataset)
    good = datasets.Dataset.from_dict({"input_ids": _lines(60, seed=3)})
    other = datasets.Dataset.from_dict({"input_ids": _lines(60, seed=4)})
    assert batch_source(good, PAD).fingerprint() == batch_source(good, PAD).fingerprint()
    assert batch_source(good, PAD).fingerprint() != batch_source(other, PAD).fingerprint()
