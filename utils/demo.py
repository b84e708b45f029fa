"""The README's main job: fine-tune a tiny GPT-2 on offline Wikipedia text, padding excluded.

    python -m utils.demo [--epochs 2] [--train-lines 2000] [--device cuda]
"""
from __future__ import annotations

import argparse
import os

from .data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer
from .tier3_training_utilities import evaluate_perplexity, test_fine_tuning


def build_tiny_gpt2(vocab_size: int, n_positions: int = 128, n_embd: int = 128, n_layer: int = 2, n_head: int = 4,
                    dropout: float = 0.0):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-lines", type=int, default=2000)
    parser.add_argument("--val-lines", type=int, default=300)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output-dir", default=os.path.join("outputs", "demo"))
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    train_text, val_text = load_wikitext("train"), load_wikitext("validation")
    print(f"corpus: {train_text.source} ({len(train_text)} train / {len(val_text)} validation lines)")
    tokenizer = train_bpe_tokenizer(train_text.lines, vocab_size=args.vocab_size)
    train = prepare_lm_dataset(train_text.lines[:args.train_lines], tokenizer, max_length=args.max_length)
    val = prepare_lm_dataset(val_text.lines[:args.val_lines], tokenizer, max_length=args.max_length)
    model = build_tiny_gpt2(len(tokenizer), n_positions=args.max_length)
    before = evaluate_perplexity(model, val, tokenizer=tokenizer, batch_size=32, device=args.device)
    print(f"before training: val loss (excl. padding) {before['loss']:.4f}, perplexity {before['perplexity']:.1f}")
    results = test_fine_tuning(model, model.config, train, val, n_epochs=args.epochs, learning_rate=args.learning_rate,
                               batch_size=args.batch_size, tokenizer=tokenizer, device=args.device,
                               output_dir=args.output_dir, warmup_ratio=0.05)
    print(results["metrics_summary"][["epoch", "train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity",
                                      "train/pad_fraction", "train/real_tokens_per_sec"]].to_string(index=False))
    print(f"pad id {results['pad_token_id']} (from {results['pad_token_id_source']}); "
          f"metrics in {results['metrics_csv']}")
    return results


if __name__ == "__main__":
    main()
