"""Speed and quality of batching: real (non-padding) training tokens/s and validation perplexity.

Same tiny GPT-2, same offline Wikipedia lines, same batch size and epochs, for each seed:
  random batches    test_fine_tuning(group_by_length=False): shuffled lines padded to their longest
  line-grouped      test_fine_tuning(group_by_length="lines"): fixed batch_size lines of similar length
  token-budget      test_fine_tuning defaults: steps filled to batch_size x mean length padded tokens
  HF defaults       transformers.Trainer with DataCollatorForLanguageModeling
  HF grouped        the same with Trainer's own length grouping

    python benchmarks/throughput.py [--lines 2000] [--batch-size 16] [--epochs 2] [--seeds 0 1] [--device cuda]
                                    [--methods default HF]   (methods whose name contains any of these words)

Quality is the exact validation perplexity (excl. padding, `evaluate_perplexity`) of each trained model, so
every method is measured by the same evaluator. Rates are real target tokens over the training time only.
"""
from __future__ import annotations

import argparse
import inspect
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer  # noqa: E402
from utils.demo import build_tiny_gpt2  # noqa: E402
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning  # noqa: E402

LEARNING_RATE = 1e-3


def ours(model, train, val, tokenizer, args, seed, group_by_length):
    kwargs = {} if group_by_length == "default" else {"group_by_length": group_by_length}
    result = test_fine_tuning(model, model.config, train, val, n_epochs=args.epochs, learning_rate=LEARNING_RATE,
                              batch_size=args.batch_size, random_seed=seed, tokenizer=tokenizer, device=args.device,
                              progress=False, save_plots=False, output_dir=tempfile.mkdtemp(), **kwargs)
    epochs = result["metrics_summary"]
    seconds = (epochs["train/real_tokens"] / epochs["train/real_tokens_per_sec"]).sum()
    real, padded = epochs["train/real_tokens"].sum(), epochs["train/padded_tokens"].sum()
    return real / seconds, padded / (real + padded)


def hf_trainer(model, train, tokenizer, args, seed, grouped):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    options = dict(output_dir=tempfile.mkdtemp(), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
                   learning_rate=LEARNING_RATE, report_to="none", save_strategy="no", logging_strategy="no", seed=seed,
                   use_cpu=args.device == "cpu", disable_tqdm=True)
    if grouped:  # transformers 5.x names it train_sampling_strategy; earlier versions group_by_length=True
        if "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters:
            options["train_sampling_strategy"] = "group_by_length"
        else:
            options["group_by_length"] = True
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=train,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    real = positions = 0
    for batch in trainer.get_train_dataloader():  # the same sampler and collator as training: count its padding
        real += int(batch["attention_mask"][:, 1:].sum())
        positions += batch["attention_mask"][:, 1:].numel()
    if args.device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    trainer.train()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return real * args.epochs / (time.perf_counter() - start), 1 - real / positions


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--val-lines", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=None, help="run only methods whose name contains one of these")
    args = parser.parse_args(argv)

    text = load_wikitext("train", source="offline")
    tokenizer = train_bpe_tokenizer(text.lines, vocab_size=4096)
    train = prepare_lm_dataset(text.lines[:args.lines], tokenizer, max_length=args.max_length)
    val = prepare_lm_dataset(load_wikitext("validation", source="offline").lines[:args.val_lines], tokenizer,
                             max_length=args.max_length)
    methods = {
        "random batches": lambda m, s: ours(m, train, val, tokenizer, args, s, False),
        "line-grouped": lambda m, s: ours(m, train, val, tokenizer, args, s, "lines"),
        "token-budget (default)": lambda m, s: ours(m, train, val, tokenizer, args, s, "default"),
        "HF Trainer defaults": lambda m, s: hf_trainer(m, train, tokenizer, args, s, grouped=False),
        "HF Trainer, length grouping": lambda m, s: hf_trainer(m, train, tokenizer, args, s, grouped=True),
    }
    if args.methods:
        methods = {name: run for name, run in methods.items() if any(word in name for word in args.methods)}
    rows = {}
    for name, run in methods.items():
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = build_tiny_gpt2(len(tokenizer), n_positions=args.max_length).to(args.device)
            rate, padded = run(model, seed)
            perplexity = evaluate_perplexity(model, val, tokenizer=tokenizer, batch_size=32)["perplexity"]
            rows.setdefault(name, []).append((rate, padded, perplexity))
            print(f"{name}, seed {seed}: {rate:,.0f} real tokens/s, {padded:.1%} padded, val perplexity {perplexity:.1f}",
                  flush=True)

    cpu = platform.processor() or platform.machine()
    print(f"\n{len(train)} lines, batch {args.batch_size}, {args.epochs} epochs, lr {LEARNING_RATE}, device {args.device} "
          f"({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}, seeds {args.seeds}\n")
    print("| batching | real tokens/s | padded positions | val perplexity (per seed) | mean |\n|---|---:|---:|---:|---:|")
    summary = {}
    for name, measured in rows.items():
        rate = statistics.mean(r for r, _, _ in measured)
        perplexities = [p for _, _, p in measured]
        summary[name] = (rate, statistics.mean(perplexities))
        print(f"| {name} | {rate:,.0f} | {statistics.mean(p for _, p, _ in measured):.1%} | "
              f"{' / '.join(f'{p:.1f}' for p in perplexities)} | {summary[name][1]:.1f} |")
    default_rate, default_ppl = summary.get("token-budget (default)", (math.nan, math.nan))
    for name, (rate, perplexity) in summary.items():
        if name != "token-budget (default)":
            print(f"default vs {name}: {default_rate / rate:.2f}x the speed, perplexity {default_ppl / perplexity - 1:+.1%}")
    return summary


if __name__ == "__main__":
    main()
