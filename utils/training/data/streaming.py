"""Streamed examples: token-budget steps formed inside a seeded buffer, resumable exactly.

A stream (a ``datasets.IterableDataset``, any iterable of examples that can be iterated again, a DataLoader over
an ``IterableDataset``) has no length, so ``max_steps`` sets the run's length and the schedule; an epoch ends
when the stream does. ``buffer_size`` examples are read at a time and planned by :func:`batch_plans.buffer_steps`
(shuffled with a generator seeded by ``(seed, epoch, buffer number)``, sorted by length, cut into steps of about
the same number of tokens, whose order is shuffled too). A checkpoint records where the current buffer starts in
the stream and how many of its steps ran: the same buffer is read again and the same steps come out, so a resumed
run equals an uninterrupted one. The position is reached by reading the stream up to it again (exact for any
source; it costs the reading); at an epoch's end it is that epoch read to its end, so a resume there reads that
epoch's pass again (rows compared, nothing trained) before the next one. Every row read again is compared with
the one the checkpoint recorded (:class:`source_contract.ReadLog`). Under torchrun each process reads its own
shard (:func:`subsets.stream_shard`); before each step the processes agree that each still has one, so they stop
together when the first shard ends.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from itertools import chain, islice

import numpy as np
import torch
from torch.utils.data import DataLoader

from .batch_plans import PlanSettings, buffer_steps
from .collate import PaddingCollator, padded_probe
from .rows import check_loader_batch, item_rows, pad_id_among_real_tokens, read_example
from .source_contract import BatchSource, ReadLog, group_into_steps
from .subsets import RowChecks, stream_shard

DEFAULT_BUFFER_SIZE = 4096


def is_stream(data) -> bool:
    """An iterable without a length: a ``datasets.IterableDataset``, a torch ``IterableDataset``, a loader over one."""
    if isinstance(data, DataLoader):
        return isinstance(data.dataset, torch.utils.data.IterableDataset)
    if isinstance(data, (torch.utils.data.IterableDataset, torch.utils.data.Dataset, Mapping, str, bytes, list, tuple)):
        return isinstance(data, torch.utils.data.IterableDataset)
    return hasattr(data, "__iter__") and not hasattr(data, "__len__")


def _all_agree(flag: bool) -> bool:
    """True when every process has ``flag`` True (one tiny all-reduce; a no-op in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


class StreamBatches(BatchSource):
    """A stream of examples, batched by token budget inside a seeded buffer (see the module docstring).

    Every row is recorded as it is read (:class:`source_contract.ReadLog`) and checked (:class:`RowChecks`:
    ``bad_examples`` says what a too-long row or one with ids outside the vocabulary does).
    """

    state_per_process = True

    def __init__(self, data, collator: PaddingCollator, pad_is_eos: bool = False, what: str = "training data",
                 buffer_size: int = DEFAULT_BUFFER_SIZE, bad_examples: str = "error"):
        if iter(data) is data:
            raise TypeError(f"The {what} is a one-shot iterator (a generator?): it cannot be read again for a second "
                            "epoch, a resume or validation. Pass a datasets.IterableDataset, a torch IterableDataset, "
                            "or an object whose __iter__ starts over.")
        self.data, self.collator, self.pad_is_eos, self.what = data, collator, pad_is_eos, what
        self.buffer_size = buffer_size
        self.checks = RowChecks(what, bad_examples)
        self.log, self.eval_log = ReadLog(what, unit="row"), ReadLog(what, unit="row")
        self.position = None  # where this process's stream stands (see state_dict)
        self.eval_pass = None  # what this process's last validation pass read
        self.resume_at = None
        self._head_rows = None  # the first HEAD_ROWS rows, read once at start-up (_head)

    # -- reading -----------------------------------------------------------------------------------
    def _shard(self, world_size: int, rank: int, epoch: int, order_state=None, replay: bool = False):
        """This process's rows of one pass. Iterating may draw from torch's RNG (a DataLoader draws its workers'
        seed): the pass starts from ``order_state`` (recorded at the epoch's start), and a replay sets torch's RNG
        back afterwards, so a resumed epoch reads as the interrupted one did and draws nothing more."""
        data = self.data
        if hasattr(data, "set_epoch"):
            data.set_epoch(epoch)  # a datasets stream's own shuffle, if the user asked for one
        data, own_rows = stream_shard(data, world_size, rank)
        current = torch.get_rng_state()
        if order_state is not None:
            torch.set_rng_state(order_state)
        items = iter(data)
        first = next(items, None)
        if replay:
            torch.set_rng_state(current)
        return own_rows(chain.from_iterable(map(self._rows, chain([first], items) if first is not None else ())))

    def _rows(self, item) -> list:
        """The examples of one item a stream yields: an example, or a collated batch of them (a DataLoader's)."""
        if isinstance(self.data, DataLoader) and self.data.batch_size is not None:
            check_loader_batch(item, self.what)
        return item_rows(item)

    def _logged(self, spec: PlanSettings, epoch: int, order_state, replay: bool):
        """This process's rows of ``epoch``, each noted in the epoch's log as it is read (see :meth:`_shard`)."""
        where = f"epoch {epoch + 1}" + ("" if spec.world_size == 1 else f" of process {spec.rank}'s shard")
        return self.log.read(self._shard(spec.world_size, spec.rank, epoch, order_state, replay), where)

    def _examples(self, rows: list, first: int, where: str) -> list:
        """Rows cut to their real span and checked (``bad_examples``); rows without a real target are dropped
        (as for lists, but not warned: a stream is never read whole)."""
        pad, kept = self.collator.pad_token_id, []
        for k, row in enumerate(rows):
            example = self.checks.check(read_example(row, first + k, pad, self.pad_is_eos),
                                        f"Row {first + k} of the {self.what} ({where})")
            if example is not None:
                kept.append(example)
        return kept

    # -- planning ----------------------------------------------------------------------------------
    def _budget(self, spec: PlanSettings, first_buffer: list) -> int:
        if spec.max_tokens_per_batch is not None:
            return spec.max_tokens_per_batch * spec.accumulation
        # The first buffer's mean length stands for the stream's, agreed over processes so every shard uses one budget.
        sums = torch.tensor([float(sum(map(len, first_buffer))), float(len(first_buffer))])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums = sums.to("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(sums)
        total, count = sums.tolist()
        return max(1, round(spec.batch_size * spec.accumulation * total / max(count, 1.0)))

    @staticmethod
    def _micro_batches(step: list, accumulation: int) -> list:
        """A step split into ``accumulation`` micro-batches; an empty one is a non-counting repeat."""
        rows = -(-len(step) // accumulation)
        micro = [step[k * rows:(k + 1) * rows] for k in range(accumulation)]
        return [[(example, True) for example in m] if m else [(step[0], False)] for m in micro]

    def plan(self, spec: PlanSettings, epoch: int):
        """This process's micro-batches of ``(Example, counts)`` of one epoch, read lazily (from the position a
        checkpoint recorded, when one was loaded: in this epoch, or at the end of the one before)."""
        recorded, self.resume_at = self.resume_at, None
        return self._epoch(spec, epoch, recorded)

    def _epoch(self, spec: PlanSettings, epoch: int, recorded: dict | None):
        start = recorded if recorded and recorded["epoch"] == epoch else None
        read, buffer, step = (start["read"], start["buffer"], start["step"]) if start else (0, 0, 0)
        skip, budget = (start["steps_done"], start["budget"]) if start else (0, None)
        shard = "" if spec.world_size == 1 else f" of process {spec.rank}'s shard"
        # One shard's epoch ends with its data; under torchrun the others stop with it, their data not read to the end.
        self.log.start(epoch, recorded and recorded["read_log"], to_end=spec.world_size == 1,
                       replay=lambda finished: self._logged(spec, finished, recorded.get("order"), replay=True))
        if start:
            self.checks.counts = dict(start["counts"])  # as they were before the buffer is read again
        order_state = start["order"] if start and start.get("order") is not None else torch.get_rng_state()
        rows = self._logged(spec, epoch, order_state, replay=bool(start))
        for _ in islice(rows, read):  # to the buffer's start: reading again is exact for any source
            pass
        while True:
            counts = dict(self.checks.counts)
            raw = list(islice(rows, self.buffer_size))
            where = f"a stream{shard}; read in epoch {epoch + 1} after its optimizer step {step}"
            examples = self._examples(raw, read, where)
            budget = budget if budget is not None else self._budget(spec, examples)
            lengths = np.fromiter(map(len, examples), np.int64, len(examples))
            for done, positions in enumerate(buffer_steps(lengths, spec, epoch, buffer, budget), start=1):
                if done <= skip:
                    continue
                if not _all_agree(True):
                    return
                step += 1
                self.position = {"epoch": epoch, "read": read, "buffer": buffer, "steps_done": done, "step": step,
                                 "budget": budget, "counts": counts, "order": order_state}
                yield from self._micro_batches([examples[i] for i in positions], spec.accumulation)
            skip, read, buffer = 0, read + len(raw), buffer + 1
            if len(raw) < self.buffer_size:
                break
        _all_agree(False)  # this shard has ended: every process ends the epoch here

    # -- the contract ------------------------------------------------------------------------------
    def steps_in_epoch(self, spec: PlanSettings, epoch: int) -> None:
        return None  # an epoch ends when the stream does

    def steps(self, spec: PlanSettings, epoch: int, start: int):
        resumes = bool(self.resume_at and self.resume_at["epoch"] == epoch)
        if start and not (resumes and self.resume_at["step"] == start):
            raise ValueError(f"Cannot resume the {self.what} {start} steps into epoch {epoch + 1}: the checkpoint "
                             "holds no stream position there. Start fresh with resume_from_checkpoint=False.")
        steps = group_into_steps(self.plan(spec, epoch), spec.accumulation, 0, self.collate)
        for index, (_, micro_batches) in enumerate(steps):
            yield start + index, micro_batches
        if not start and (self.position is None or self.position["epoch"] != epoch):
            raise ValueError(f"The {self.what} yielded no optimizer step in epoch {epoch + 1}: a stream must start "
                             "again from its beginning when iterated again (and, under torchrun, give every process a "
                             "shard). Pass a re-iterable source, e.g. a datasets.IterableDataset.")

    def eval_plan(self, batch_size, world_size=1, rank=0):
        """Validation: each process's shard once, sorted by length inside each buffer (least padding)."""
        self.checks.counts = dict.fromkeys(self.checks.counts, 0)  # the counts of the last pass are reported
        self.eval_log.start(0)
        rows = self.eval_log.read(self._shard(world_size, rank, 0), "a validation pass")
        read = 0
        while raw := list(islice(rows, self.buffer_size)):
            examples = sorted(self._examples(raw, read, "a stream; read for validation"), key=len, reverse=True)
            read += len(raw)
            for k in range(0, len(examples), batch_size):
                yield [(example, True) for example in examples[k:k + batch_size]]
        self.eval_pass = {"world_size": world_size, "rank": rank, "read": self.eval_log.state_dict()}

    def collate(self, planned_batch) -> dict:
        return self.collator(planned_batch)  # every row was checked as it was read

    # -- start-up ----------------------------------------------------------------------------------
    HEAD_ROWS = 64  # the most any start-up probe looks at

    def _head(self, n: int, checked: bool = True) -> list:
        """The examples among the stream's first ``n`` rows. The rows are read once and kept: the start-up probes
        (checks, the loss-path probe, the fingerprint) would otherwise each open the stream again (for a hub
        stream, new connections; for a reader that stops rewinding, a pass)."""
        if self._head_rows is None:
            self._head_rows = list(islice(self._shard(1, 0, 0), self.HEAD_ROWS))
        counts, limits = dict(self.checks.counts), (self.checks.vocab_size, self.checks.max_length)
        if not checked:
            self.checks.vocab_size = self.checks.max_length = None
        try:
            examples = self._examples(self._head_rows[:n], 0, "a stream; read at start-up")
        finally:  # reading ahead counts nothing: the run reads these rows again
            self.checks.counts, (self.checks.vocab_size, self.checks.max_length) = counts, limits
        if not examples:
            found = (f"no example with a real target among its first {min(n, len(self._head_rows))} rows"
                     if self._head_rows else "no row at all")
            raise ValueError(f"The {self.what} yields {found}. Pass a non-empty stream of tokenized sequences.")
        return examples

    def first_batch(self) -> dict:
        return self.collate([(example, True) for example in self._head(2)])

    def padded_batch(self) -> dict:
        return padded_probe(self._head(self.HEAD_ROWS), self.collator)

    def check_ids(self, vocab_size: int) -> None:
        self.checks.vocab_size = vocab_size  # each row is checked as it is read

    def check_lengths(self, limit: int | None) -> None:
        self.checks.max_length = limit

    def pad_id_inside_real_tokens(self, pad_token_id: int) -> bool:
        batch = self.padded_batch()
        return pad_id_among_real_tokens(batch["input_ids"], batch["attention_mask"], pad_token_id)

    def fingerprint(self) -> str:
        """A stream is not read ahead of training: its kind, buffer size and first examples stand for it; every
        row read is recorded as it is read (a resume compares them)."""
        digest = hashlib.sha256(f"stream {type(self.data).__name__} {self.buffer_size}".encode())
        for example in self._head(16, checked=False):
            digest.update(example.input_ids.numpy().tobytes())
        return digest.hexdigest()

    def report(self) -> dict:
        return dict(self.checks.counts)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where this process's stream stands: its epoch, the current buffer's start (examples read before it)
        and number, the steps of it already run, the token budget, the rows read in the epoch so far; and what
        the last validation pass read."""
        position = None if self.position is None else dict(self.position, read_log=self.log.state_dict())
        return {"position": position, "eval_pass": self.eval_pass}

    def load_state_dict(self, state: dict | None) -> None:
        if state and "position" not in state:
            state = {"position": state, "eval_pass": None}  # a checkpoint written before the rows were recorded
        if not state:
            return
        self.resume_at = state["position"]
        if self.resume_at is not None:
            self.resume_at.setdefault("read_log", None)
            self.resume_at.setdefault("counts", dict(self.checks.counts))
        if state["eval_pass"]:  # read the validation stream now: a changed row is named before any training
            recorded = state["eval_pass"]
            self.eval_log.start(0, recorded["read"])
            for _ in self.eval_log.read(self._shard(recorded["world_size"], recorded["rank"], 0), "a validation pass"):
                pass
            self.eval_pass = recorded


