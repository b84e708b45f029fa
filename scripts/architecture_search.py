"""The README's worked architecture search: depth, width and learning rate of a GPT-2 on the shipped corpus.

    python scripts/architecture_search.py [--trials 10] [--epochs 2] [--out runs/architecture-search]

Prints the trials table (markdown) and copies the Pareto figure to docs/search_pareto.png. Everything is local:
offline Wikipedia text, a BPE tokenizer trained here, models built from configs.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer  # noqa: E402
from utils.tier3_training_utilities import test_hyperparameter_search  # noqa: E402

MODEL_SPACE = {"n_layer": ("int", 1, 3), "n_embd": [32, 64, 128]}
COLUMNS = ["number", "params_n_layer", "params_n_embd", "params_learning_rate", "n_parameters", "train_real_tokens",
           "train_seconds", "flops_estimate", "val_loss", "val_bits_per_byte"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-lines", type=int, default=400)
    parser.add_argument("--val-lines", type=int, default=100)
    parser.add_argument("--out", default="runs/architecture-search")
    parser.add_argument("--figure", default=str(ROOT / "docs" / "search_pareto.png"))
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    train_text, val_text = load_wikitext("train"), load_wikitext("validation")
    tokenizer = train_bpe_tokenizer(train_text.lines, vocab_size=2048)
    train = prepare_lm_dataset(train_text.lines[:args.train_lines], tokenizer, max_length=64)
    val = prepare_lm_dataset(val_text.lines[:args.val_lines], tokenizer, max_length=64)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_head=2, n_layer=1, n_embd=32,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)

    def sized_gpt2(params):  # the trial's model parameters -> the model they describe
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(**dict(config.to_dict(), **params)))

    search = test_hyperparameter_search(
        sized_gpt2, config, train, val, n_trials=args.trials, n_epochs=args.epochs, model_space=MODEL_SPACE,
        search_space={"learning_rate": ("log", 3e-4, 3e-3)}, objectives=("val_loss", "n_parameters"),
        batch_size=16, tokenizer=tokenizer, output_dir=args.out, progress=False, study_name="architecture-search")
    trials = search["trials"].sort_values(["n_parameters", "val_loss"])
    on_front = set(search["pareto"]["number"])
    print(f"{len(train)} training / {len(val)} validation lines, vocabulary {len(tokenizer)}, {args.epochs} epochs, "
          f"torch threads {torch.get_num_threads()}")
    print("| trial | n_layer | n_embd | learning rate | parameters | tokens trained | training s | FLOPs (6NT) | "
          "val loss | val bits/byte | Pareto |")
    print("|" + "---|" * 11)
    for row in trials[COLUMNS].itertuples(index=False):
        print(f"| {row.number} | {row.params_n_layer} | {row.params_n_embd} | {row.params_learning_rate:.2e} | "
              f"{row.n_parameters:,} | {row.train_real_tokens:,} | {row.train_seconds:.1f} | "
              f"{row.flops_estimate:.2e} | {row.val_loss:.4f} | {row.val_bits_per_byte:.4f} | "
              f"{'yes' if row.number in on_front else ''} |")
    print("best (lowest val loss):", search["best_model_params"], search["best_params"])
    if "pareto" in search["plot_paths"]:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(search["plot_paths"]["pareto"], args.figure)
        print("figure:", args.figure)


if __name__ == "__main__":
    main()
