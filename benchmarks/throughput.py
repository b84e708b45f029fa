"""Real (non-padding) training tokens per second: this package vs bare loops vs HF Trainer.

One run, same tiny GPT-2, same offline Wikipedia lines, same batch size, same hardware:
  (a) test_fine_tuning, group_by_length=True      (b) test_fine_tuning, group_by_length=False
  (c) bare loop, length-sorted batches (the limit) (d) bare loop, shuffled batches padded to their longest
  (e) transformers.Trainer with its defaults (+ DataCollatorForLanguageModeling)

    python benchmarks/throughput.py [--lines 1500] [--batch-size 16] [--repeats 2] [--device cuda]

Each configuration trains one epoch from the same initial weights; the best of --repeats runs is kept.
Rates are real target tokens over the training loop's time (for Trainer: trainer.train()); the
seconds column of (a) and (b) is the whole test_fine_tuning call, input checks and validation included.
"""
from __future__ import annotations

import argparse
import copy
import math
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer  # noqa: E402
from utils.demo import build_tiny_gpt2  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402
from utils.training.data import PaddingCollator, to_device, to_examples  # noqa: E402
from utils.training.loss import masked_lm_loss  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(model, examples, pad_id, batch_size, device, sort_by_length, seed=0):
    """A minimal correct loop: pad each batch to its longest line, the package's one masked loss, AdamW."""
    items = to_examples(examples, pad_id)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if sort_by_length:
        order.sort(key=lambda i: len(items[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if sort_by_length:
        random.Random(seed).shuffle(batches)
    collate = PaddingCollator(pad_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    real = positions = 0
    _sync(device)
    start = time.perf_counter()
    for batch_ids in batches:
        batch = to_device(collate([(items[i], True) for i in batch_ids]), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        stats = masked_lm_loss(logits, batch["input_ids"], batch["labels"], batch["attention_mask"], pad_id)
        (stats.loss_sum / stats.real_targets.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        real += stats.real_targets
        positions += stats.target_positions
    _sync(device)
    seconds = time.perf_counter() - start
    real = int(real)
    return real / seconds, 1 - real / positions, seconds


def ours(model, train, val, tokenizer, batch_size, device, group_by_length):
    start = time.perf_counter()
    result = test_fine_tuning(model, model.config, train, val, n_epochs=1, learning_rate=1e-3, batch_size=batch_size,
                              weight_decay=0.0, warmup_ratio=0.0, lr_schedule="constant", tokenizer=tokenizer,
                              device=device, group_by_length=group_by_length, progress=False, save_plots=False,
                              output_dir=tempfile.mkdtemp())
    seconds = time.perf_counter() - start  # the whole call: input checks, training, the (tiny) validation pass
    row = result["metrics_summary"].iloc[0]
    # Rate over the training loop only, as for the other runs; the table also shows the whole call's seconds.
    return row["train/real_tokens_per_sec"], row["train/pad_fraction"], seconds


def hf_trainer(model, train, tokenizer, batch_size, device):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=batch_size,
                             learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no",
                             use_cpu=device.type == "cpu", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    real = positions = 0
    for batch in trainer.get_train_dataloader():  # same sampler and collator as training: count its padding
        real += int(batch["attention_mask"][:, 1:].sum())
        positions += batch["attention_mask"][:, 1:].numel()
    _sync(device)
    start = time.perf_counter()
    trainer.train()
    _sync(device)
    seconds = time.perf_counter() - start
    return real / seconds, 1 - real / positions, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    text = load_wikitext("train", source="offline")
    tokenizer = train_bpe_tokenizer(text.lines, vocab_size=4096)
    train = prepare_lm_dataset(text.lines[:args.lines], tokenizer, max_length=args.max_length)
    val = prepare_lm_dataset(load_wikitext("validation", source="offline").lines[:16], tokenizer, max_length=args.max_length)
    torch.manual_seed(0)
    initial = build_tiny_gpt2(len(tokenizer), n_positions=args.max_length).to(device)
    pad_id = tokenizer.pad_token_id

    runs = {
        "(a) test_fine_tuning, group_by_length=True": lambda m: ours(m, train, val, tokenizer, args.batch_size, device, True),
        "(b) test_fine_tuning, group_by_length=False": lambda m: ours(m, train, val, tokenizer, args.batch_size, device, False),
        "(c) bare loop, length-sorted batches": lambda m: bare_loop(m, train, pad_id, args.batch_size, device, True),
        "(d) bare loop, shuffled batches": lambda m: bare_loop(m, train, pad_id, args.batch_size, device, False),
        "(e) HF Trainer defaults": lambda m: hf_trainer(m, train, tokenizer, args.batch_size, device),
    }
    results = {}
    for repeat in range(args.repeats):
        for name, run in runs.items():
            measured = run(copy.deepcopy(initial))
            if name not in results or measured[0] > results[name][0]:
                results[name] = measured
    cpu = platform.processor() or platform.machine()
    print(f"\n{len(train)} lines, batch {args.batch_size}, max_length {args.max_length}, device {device} "
          f"({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}, best of {args.repeats}\n")
    print(f"| run | real tokens/s | padded positions | seconds |\n|---|---:|---:|---:|")
    for name, (rate, padded, seconds) in results.items():
        print(f"| {name} | {rate:,.0f} | {padded:.1%} | {seconds:.1f} |")
    a = results["(a) test_fine_tuning, group_by_length=True"][0]
    for name in list(results)[1:]:
        print(f"(a) / {name[:3]}: {a / results[name][0]:.2f}x")
    return results


if __name__ == "__main__":
    main()
