"""Examples in memory or on disk as a source: planned (shuffled, grouped, sharded) over one array of lengths,
read from their table (:mod:`example_tables`) and collated per batch. Every token was hashed before the run
(the fingerprint), so a resume needs nothing but the plan, which is recomputed from the settings.
"""
from __future__ import annotations

import numpy as np

from .batch_plans import (MEGA_BATCH_FACTOR, Plan, PlanSettings, epoch_order, resolve_grouping, shard_batches,
                          token_budget_steps, token_plan)
from .collate import PaddingCollator, padded_probe
from .example_checks import check_length
from .example_tables import ExampleList
from .examples import split_positions
from .source_contract import BatchSource, group_into_steps


class ExampleBatches(BatchSource):
    """Examples planned (shuffled, grouped, sharded) over one array of lengths, read and collated per batch.

    ``examples`` is a table (:mod:`example_tables`): a list of token lists or an Arrow ``Dataset`` is read per
    batch; a list of ``Example`` is taken as it is.
    """

    def __init__(self, examples, collator: PaddingCollator, what: str = "training data"):
        self.examples = ExampleList(examples) if isinstance(examples, list) else examples
        self.collator = collator
        self.what = what
        self.lengths = self.examples.lengths  # numpy int64, one entry per example
        # What the start-up checks passed, so a search's trials do not rescan the same examples.
        self._checked = {"vocab_size": None, "max_length": None}
        self._last_plan = (None, None)

    def plan(self, spec: PlanSettings, epoch: int) -> Plan:
        """This rank's micro-batches of one epoch, in order; consecutive ``accumulation`` of them form a step."""
        if self._last_plan[0] != (spec, epoch):  # counted before the run, then run: made once
            self._last_plan = ((spec, epoch), self._make_plan(spec, epoch))
        return self._last_plan[1]

    def _make_plan(self, spec: PlanSettings, epoch: int) -> Plan:
        grouping = resolve_grouping(spec.group_by_length, spec.shuffle)
        if grouping == "tokens":
            per_step = spec.micro_batches_per_step
            indices, bounds = token_budget_steps(
                self.lengths, step_budget=self.step_token_budget(spec), micro_batches_per_step=per_step,
                examples_per_mega_batch=spec.batch_size * per_step * MEGA_BATCH_FACTOR, shuffle=spec.shuffle,
                seed=spec.seed, epoch=epoch)
            return token_plan(indices, bounds, spec.accumulation, spec.world_size, spec.rank)
        order = epoch_order(self.lengths, spec.batch_size * spec.micro_batches_per_step, shuffle=spec.shuffle,
                            group_by_length=bool(grouping), seed=spec.seed, epoch=epoch)
        return shard_batches(order, spec.batch_size, spec.world_size, spec.rank)

    def step_token_budget(self, spec: PlanSettings) -> int:
        """Tokens of one optimizer step: ``max_tokens_per_batch`` per micro-batch, else ``batch_size`` x the
        mean example length, so the mean micro-batch holds about ``batch_size`` lines and learning rates tuned
        for ``batch_size`` carry over. Computed per step, so 8 x 1 and 2 x 4 get the same budget exactly."""
        per_step = spec.micro_batches_per_step
        if spec.max_tokens_per_batch is not None:
            return spec.max_tokens_per_batch * per_step
        # Python ints: the same rounding as the list code had, for any corpus size.
        return max(1, round(spec.batch_size * per_step * int(self.lengths.sum()) / len(self.lengths)))

    def eval_plan(self, batch_size, world_size=1, rank=0) -> Plan:
        """Validation order does not change token-weighted sums, so sort by length: least padding."""
        return shard_batches(np.argsort(-self.lengths, kind="stable"), batch_size, world_size, rank)

    def collate(self, planned_batch):
        examples = self.examples.examples([i for i, _ in planned_batch])
        return self.collator([(example, counts) for example, (_, counts) in zip(examples, planned_batch)])

    def steps_in_epoch(self, spec: PlanSettings, epoch: int) -> int:
        return -(-len(self.plan(spec, epoch)) // spec.accumulation)

    def steps(self, spec: PlanSettings, epoch: int, start: int):
        """The plan's steps from ``start`` on: the plan is a pure function of the settings and the epoch."""
        return group_into_steps(self.plan(spec, epoch), spec.accumulation, start, self.collate)

    def first_batch(self) -> dict:
        return self.collate(self.plan(PlanSettings(batch_size=2), epoch=0)[0])

    def padded_batch(self) -> dict:
        by_length = np.argsort(self.lengths, kind="stable")
        return padded_probe(self.examples.examples([int(by_length[-1]), int(by_length[0])]), self.collator)

    def check_ids(self, vocab_size: int) -> None:
        """Every token id fits the vocabulary, naming the first example that does not."""
        if self._checked["vocab_size"] != vocab_size:
            self.examples.check_ids(vocab_size, self.what)
            self._checked["vocab_size"] = vocab_size

    def check_lengths(self, limit: int | None) -> None:
        if limit is not None and self._checked["max_length"] != limit:
            too_long = np.flatnonzero(self.lengths > limit)
            if len(too_long):
                check_length(int(self.lengths[too_long[0]]), limit, f"Example {int(too_long[0])} of the {self.what}")
            self._checked["max_length"] = limit

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        """Whether the pad id occurs where a token is real (then it is a real token of the vocabulary)."""
        return self.examples.pad_inside(pad_token_id)

    def fingerprint(self) -> str:
        """Identifies the data, so a resume sees the same: every token for data in memory, the Dataset's own
        fingerprint and the lengths for an Arrow ``Dataset``."""
        return self.examples.fingerprint()

    def split(self, val_fraction: float, seed: int) -> tuple["ExampleBatches", "ExampleBatches"]:
        """Seeded random hold-out; both parts keep the original order (``shuffle=False`` stays meaningful)."""
        train, val = split_positions(len(self), val_fraction, seed)
        return (ExampleBatches(self.examples.subset(train), self.collator, "training data"),
                ExampleBatches(self.examples.subset(val), self.collator, "validation data"))

    def __len__(self) -> int:
        return len(self.examples)
