"""The data group of the settings: how examples are batched, held out, streamed and checked (the sources and the
batch plans read it)."""
from __future__ import annotations

from dataclasses import dataclass

from ..setting_rules import (FREE, MATCH, PER_PROCESS, POSITIVE, POSITIVE_OR_NONE, SettingsGroup, check_bool,
                             check_int, number, one_of, setting)

GROUPINGS = ("auto", "tokens", "lines", True, False)
BAD_EXAMPLES = ("error", "skip", "truncate")  # what a stream's row that fails its checks does (subsets.py)


def _check_padding_multiple(name, value):
    if value not in (None, "auto"):
        check_int(name, value, minimum=1)


@dataclass
class DataSettings(SettingsGroup):
    # Per process: resumed on another number of processes, batch_size x processes must stay (sharded_checkpoint.py).
    batch_size: int = setting(4, check=POSITIVE, resume=PER_PROCESS, setup=True, search=True)
    shuffle: bool = setting(True, check=check_bool, resume=MATCH, setup=True, search=True)
    # "auto": token-budget steps inside length groups when shuffling, the given order when not (CLAUDE.md).
    group_by_length: bool | str = setting("auto", check=one_of(GROUPINGS), resume=MATCH, setup=True, search=True)
    # Padded tokens per micro-batch; None: batch_size x mean length. Per process, as batch_size.
    max_tokens_per_batch: int | None = setting(None, check=POSITIVE_OR_NONE, resume=PER_PROCESS, setup=True,
                                               search=True)
    # "auto": 64 on CUDA (bounded shapes), exact lengths on CPU. Free on resume: plans are made on real lengths and
    # padding is masked, so only the shapes change (a GPU checkpoint resumed on a CPU keeps its plan).
    pad_to_multiple_of: int | str | None = setting("auto", check=_check_padding_multiple, resume=FREE, setup=True,
                                                   search=True)
    # Held out of train_data when val_data is None: another fraction is other training data (must match then).
    val_fraction: float = setting(0.2, check=number(0.0, high=1.0, low_open=True), resume=MATCH, setup=True,
                                  search=True, when="held_out")
    # Streamed data: examples shuffled and grouped by length together in a buffer of this many. Must match on a
    # stream's resume: another buffer makes other steps of the same rows.
    stream_buffer_size: int = setting(4096, check=POSITIVE, resume=MATCH, setup=True, search=True, when="stream")
    # Streamed data, checked as it is read: a too-long row or one with ids outside the vocabulary stops the run
    # ("error", naming the row), is gone past ("skip") or cut to the model's positions ("truncate"); counted in
    # results["bad_examples"]. Must match on a stream's resume: another choice keeps other rows (or stops).
    bad_examples: str = setting("error", check=one_of(BAD_EXAMPLES), resume=MATCH, setup=True, search=True,
                                when="stream")

    def padding_multiple(self, device) -> int | None:
        """On CUDA every new batch shape costs time the first time it runs; a multiple of 64 bounds the shapes."""
        if self.pad_to_multiple_of == "auto":
            return 64 if device.type == "cuda" else None
        return self.pad_to_multiple_of
