"""Start-up on large data: seconds from the call to the first optimizer step, and peak RSS growth meanwhile.

Each measurement runs in a fresh process: the data is made ready (a memory-mapped Arrow ``Dataset`` loaded with
``load_from_disk``; for the list form, its rows as Python lists), then the clock starts, the training call is made
and the process reports and exits at the end of the first optimizer step. The data is generated here: random token
ids of 8-128 tokens per row (int32, as ``datasets`` stores tokenizer output), saved with ``save_to_disk``.

    python benchmarks/scale.py [--rows 100000 1000000 2000000] [--forms ...] [--timeout 300] [--data /tmp/scale-data]

Forms: lists (this package, token lists), arrow (this package, the memory-mapped Dataset), stream (this package,
``Dataset.to_iterable_dataset`` with max_steps), hf (HF ``Trainer`` on the Dataset), hf_grouped (the same with its
length grouping).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, BATCH = 5000, 16
FORMS = ("lists", "arrow", "stream", "hf", "hf_grouped")


def make_data(rows: int, folder: Path) -> Path:
    path = folder / f"rows-{rows}"
    if not path.exists():
        import numpy as np
        import pyarrow as pa
        from datasets import Dataset

        rng = np.random.default_rng(0)
        lengths = rng.integers(8, 129, rows)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        values = pa.array(rng.integers(1, VOCAB - 1, int(offsets[-1])).astype(np.int32))
        column = pa.LargeListArray.from_arrays(pa.array(offsets), values).cast(pa.list_(pa.int32()))
        Dataset(pa.table({"input_ids": column})).save_to_disk(str(path))
    return path


class PeakRss:
    """Resident memory sampled every 5 ms from the call on (``ru_maxrss`` would also hold the data's preparation)."""

    def __init__(self):
        self.start = self.peak = self.now()
        threading.Thread(target=self.poll, daemon=True).start()

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def poll(self):
        while True:
            self.peak = max(self.peak, self.now())
            time.sleep(0.005)


def measure(form: str, path: str) -> None:
    """In a fresh process: prepare, start the clock, call, report at the end of the first optimizer step."""
    import torch
    from datasets import load_from_disk

    from utils.demo import build_tiny_gpt2

    dataset = load_from_disk(path)
    data = dataset.data.column("input_ids").to_pylist() if form == "lists" else dataset
    torch.manual_seed(0)
    model = build_tiny_gpt2(VOCAB)
    model.config.pad_token_id = 0

    def report(*_):
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": seconds, "rss_growth_mb": (rss.peak - rss.start) / 2**20}), flush=True)
        os._exit(0)

    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(report)
    rss = PeakRss()
    started = time.perf_counter()
    if form.startswith("hf"):
        hf_trainer(model, dataset, grouped=form == "hf_grouped")
    else:
        from utils.tier3_training_utilities import test_fine_tuning

        val = data[:64] if form == "lists" else dataset.select(range(64))
        train = dataset.to_iterable_dataset(num_shards=64) if form == "stream" else data
        test_fine_tuning(model, model.config, train, val, batch_size=BATCH, progress=False, save_plots=False,
                         output_dir=tempfile.mkdtemp(), **({"max_steps": 1000} if form == "stream" else {}))


def hf_trainer(model, dataset, grouped: bool) -> None:
    import inspect

    import torch
    from transformers import Trainer, TrainingArguments

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, r in enumerate(rows):
            ids[k, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[k, :len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    options = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, report_to="none",
                   save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    if grouped:
        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            options["train_sampling_strategy"] = "group_by_length"
        else:
            options["group_by_length"] = True
    Trainer(model=model, args=TrainingArguments(**options), train_dataset=dataset, data_collator=collate).train()


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "scale-data"))
    args = parser.parse_args(argv)
    folder = Path(args.data)
    folder.mkdir(parents=True, exist_ok=True)
    results = []
    print("| data | form | call -> first optimizer step | peak RSS growth |\n|---|---|---:|---:|")
    for rows in args.rows:
        path = make_data(rows, folder)
        for form in args.forms:
            try:
                done = subprocess.run([sys.executable, __file__, "--measure", form, str(path)], capture_output=True,
                                      text=True, timeout=args.timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"))
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                figure = json.loads(lines[-1]) if lines else {"error": (done.stderr or done.stdout)[-500:]}
            except subprocess.TimeoutExpired:
                figure = {"timeout": args.timeout}
            results.append(dict(figure, rows=rows, form=form))
            if "seconds" in figure:
                print(f"| {rows:,} rows | {form} | {figure['seconds']:.1f} s | +{figure['rss_growth_mb']:,.0f} MB |", flush=True)
            else:
                print(f"| {rows:,} rows | {form} | {'> %d s (stopped)' % args.timeout if 'timeout' in figure else 'failed'} | — |",
                      flush=True)
                if "error" in figure:
                    print(figure["error"], file=sys.stderr)
    return results


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--measure":
        measure(sys.argv[2], sys.argv[3])
    else:
        main()
