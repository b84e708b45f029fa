"""Cold (first) and warm (second) epoch speed of each way to train, each in a fresh process.

On a GPU every new batch shape costs a warm-up the first time, so the epoch a user feels is the cold one.
For each method: real (non-padding) training tokens/s of epoch 1 and epoch 2, padded fraction, distinct
batch shapes, peak GPU memory.

    python benchmarks/gpu_epochs.py --device cuda                 # GPT-2-small shape, lines up to 512 tokens
    python benchmarks/gpu_epochs.py --device cpu --model tiny --lines 200 --max-length 64 --batch-size 8  # smoke run

Methods: ours (defaults), ours compile=True, ours with exact-length grouping (no bounded widths), a naive bare
loop (shuffled lines padded to their longest), HF Trainer defaults, HF Trainer with length grouping +
pad_to_multiple_of=64 + bf16 (a knowledgeable user's best). No figure in the README comes from this script
until it has been run on a GPU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer  # noqa: E402

METHODS = ("ours", "ours_compile", "ours_exact_lengths", "bare_naive", "hf_defaults", "hf_best")
SHAPES = {"small": dict(n_embd=768, n_layer=12, n_head=12), "tiny": dict(n_embd=64, n_layer=2, n_head=2)}


def _data(args):
    text = load_wikitext("train", source="offline")
    tokenizer = train_bpe_tokenizer(text.lines, vocab_size=args.vocab_size)
    train = prepare_lm_dataset(text.lines[:args.lines], tokenizer, max_length=args.max_length)
    val = prepare_lm_dataset(load_wikitext("validation", source="offline").lines[:64], tokenizer, max_length=args.max_length)
    return tokenizer, train, val


def _model(args, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=args.max_length, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, **SHAPES[args.model])
    return GPT2LMHeadModel(config).to(args.device)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ours(args, tokenizer, train, val, **options):
    from utils.tier3_training_utilities import test_fine_tuning

    model = _model(args, tokenizer)
    result = test_fine_tuning(model, model.config, train, val, n_epochs=2, learning_rate=3e-4, batch_size=args.batch_size,
                              tokenizer=tokenizer, device=args.device, progress=False, save_plots=False,
                              output_dir=tempfile.mkdtemp(), **options)
    epochs = result["metrics_summary"]
    real, padded = epochs["train/real_tokens"], epochs["train/padded_tokens"]
    return {"cold": float(epochs["train/real_tokens_per_sec"].iloc[0]), "warm": float(epochs["train/real_tokens_per_sec"].iloc[1]),
            "padded": float(padded.sum() / (real.sum() + padded.sum())),
            "shapes": int(epochs["train/distinct_batch_shapes"].iloc[-1]),
            "precision": result["precision_used"]}


def _bare_naive(args, tokenizer, train, val):
    from utils.training.data import PaddingCollator, to_device, to_examples
    from utils.training.loss import masked_lm_loss

    model = _model(args, tokenizer)
    examples, collate = to_examples(train, tokenizer.pad_token_id), PaddingCollator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    rates, shapes, real_total, positions_total = [], set(), 0, 0
    for epoch in range(2):
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(epoch)).tolist()
        real = 0
        _sync(args.device)
        start = time.perf_counter()
        for i in range(0, len(order), args.batch_size):
            batch = to_device(collate([(examples[j], True) for j in order[i:i + args.batch_size]]), torch.device(args.device))
            shapes.add(tuple(batch["input_ids"].shape))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            sums = masked_lm_loss(logits, batch["input_ids"], batch["labels"], batch["attention_mask"], tokenizer.pad_token_id)
            (sums.loss_sum / sums.real_targets.clamp(min=1)).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            real += int(sums.real_targets)
            positions_total += int(sums.positions)
        _sync(args.device)
        rates.append(real / (time.perf_counter() - start))
        real_total += real
    return {"cold": rates[0], "warm": rates[1], "padded": 1 - real_total / positions_total, "shapes": len(shapes),
            "precision": "fp32"}


def _hf(args, tokenizer, train, val, best):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    model = _model(args, tokenizer)
    options = dict(output_dir=tempfile.mkdtemp(), num_train_epochs=2, per_device_train_batch_size=args.batch_size,
                   learning_rate=3e-4, report_to="none", save_strategy="no", logging_strategy="no",
                   use_cpu=args.device == "cpu", disable_tqdm=True)
    if best:
        options["bf16"] = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        import inspect

        grouping = "train_sampling_strategy" in inspect.signature(TrainingArguments).parameters
        options.update({"train_sampling_strategy": "group_by_length"} if grouping else {"group_by_length": True})
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False, pad_to_multiple_of=64 if best else None)
    seconds = []

    class EpochTimer(TrainerCallback):
        def on_epoch_begin(self, *_, **__):
            _sync(args.device)
            seconds.append(-time.perf_counter())

        def on_epoch_end(self, *_, **__):
            _sync(args.device)
            seconds[-1] += time.perf_counter()

    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=train, data_collator=collator,
                      callbacks=[EpochTimer()])
    real = positions = 0
    shapes = set()
    for batch in trainer.get_train_dataloader():  # the same sampler and collator: count real tokens and shapes
        real += int(batch["attention_mask"][:, 1:].sum())
        positions += batch["attention_mask"][:, 1:].numel()
        shapes.add(tuple(batch["input_ids"].shape))
    trainer.train()
    return {"cold": real / seconds[0], "warm": real / seconds[1], "padded": 1 - real / positions, "shapes": len(shapes),
            "precision": "bf16" if options.get("bf16") else "fp32"}


def run_one(method: str, args) -> dict:
    tokenizer, train, val = _data(args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    measured = {
        "ours": lambda: _ours(args, tokenizer, train, val),
        "ours_compile": lambda: _ours(args, tokenizer, train, val, compile=True),
        "ours_exact_lengths": lambda: _ours(args, tokenizer, train, val, pad_to_multiple_of=None),
        "bare_naive": lambda: _bare_naive(args, tokenizer, train, val),
        "hf_defaults": lambda: _hf(args, tokenizer, train, val, best=False),
        "hf_best": lambda: _hf(args, tokenizer, train, val, best=True),
    }[method]()
    measured["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    return measured


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", choices=sorted(SHAPES), default="small")
    parser.add_argument("--lines", type=int, default=3000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--run", choices=METHODS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.run:
        print("RESULT " + json.dumps(run_one(args.run, args)), flush=True)
        return None
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--methods" and a not in METHODS]
    results = {}
    for method in args.methods:
        done = subprocess.run([sys.executable, __file__, *passthrough, "--run", method], capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[method] = json.loads(line[len("RESULT "):])
        print(method, results[method], flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else args.device
    print(f"\n{name}, GPT-2 {args.model}, {args.lines} lines <= {args.max_length} tokens, batch {args.batch_size}, "
          f"torch {torch.__version__}\n")
    print("| method | precision | cold tokens/s | warm tokens/s | padded | shapes | peak GiB |\n|---|---|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {method} | {r['precision']} | {r['cold']:,.0f} | {r['warm']:,.0f} | {r['padded']:.1%} | {r['shapes']} | {peak} |")
    if "ours" in results:
        for method, r in results.items():
            if method != "ours":
                print(f"ours cold / {method} cold: {results['ours']['cold'] / r['cold']:.2f}x")
    return results


if __name__ == "__main__":
    main()
