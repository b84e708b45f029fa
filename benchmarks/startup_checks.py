"""What the start-up checks of issue 45 cost: each piece timed in-process (best of n), for the README's model and a
GPT-2-small-sized one (768 wide, 12 layers, the README's 4,096-token vocabulary), and the README snippet's whole
start-up (the call to the first training step) for comparison.

    python benchmarks/startup_checks.py            # both models
    python benchmarks/startup_checks.py readme     # one

The probes do not run on a Hugging Face causal LM whose forward is transformers' own (trusted by construction);
"probes run" times them on the same model made untrusted (an instance ``forward``), as they run on a user's module.
"""
import sys
import tempfile
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer
from utils.tier3_training_utilities import test_fine_tuning
from utils.training import trainer as trainer_module
from utils.training.loss import ModelCaller
from utils.training.metrics import set_aside_earlier_outputs
from utils.training.model import check_parameter_values, probe_model
from utils.training.model.embeddings import embedding_roles

SIZES = {"readme": dict(n_embd=128, n_layer=2, n_head=4, n_positions=128),
         "gpt2-small-sized": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)}


def best_ms(function, repeats=5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * min(times)


def pieces(kind: str, train) -> dict:
    torch.manual_seed(0)
    sizes = SIZES[kind]
    model = GPT2LMHeadModel(GPT2Config(vocab_size=4096, **sizes))
    caller, positions = ModelCaller(model, 4096), sizes["n_positions"]
    tokens = torch.tensor([token for line in train[:20] for token in line["input_ids"]][:200])
    batch = {"input_ids": tokens.view(2, 100), "attention_mask": torch.ones(2, 100, dtype=torch.long)}

    def probes():
        return probe_model(model, [batch], vocab_size=4096, pad_token_id=4095, limit=positions, skip=(), seed=0)
    empty = tempfile.mkdtemp()
    found = {"parameter values": best_ms(lambda: check_parameter_values(model)),
             "embedding discovery forward (undeclared sizes)": best_ms(lambda: embedding_roles(model, caller, None)),
             "probes (HF, trusted: skipped)": best_ms(probes),
             "earlier outputs (empty folder)": best_ms(lambda: set_aside_earlier_outputs(empty))}
    model.forward = model.forward  # an instance attribute: no longer trusted by construction
    found["probes run"] = best_ms(probes, repeats=3)
    return found


def readme_start_up(train, val, tokenizer) -> float:
    """Seconds from the README's call to its first training epoch (stopped there)."""
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SIZES["readme"])
    model, reached = GPT2LMHeadModel(config), {}

    def stop(self, epoch):
        reached["at"] = time.perf_counter()
        raise KeyboardInterrupt

    original, trainer_module.Trainer.train_epoch = trainer_module.Trainer.train_epoch, stop
    try:
        started = time.perf_counter()
        test_fine_tuning(model, config, train, val, n_epochs=2, learning_rate=1e-3, batch_size=16,
                         tokenizer=tokenizer, progress=False, save_plots=False, output_dir=tempfile.mkdtemp())
    finally:
        trainer_module.Trainer.train_epoch = original
    return reached["at"] - started


def main():
    train_text, val_text = load_wikitext("train"), load_wikitext("validation")
    tokenizer = train_bpe_tokenizer(train_text.lines, vocab_size=4096)
    train = prepare_lm_dataset(train_text.lines[:1000], tokenizer, max_length=128)
    val = prepare_lm_dataset(val_text.lines[:300], tokenizer, max_length=128)
    for kind in sys.argv[1:] or list(SIZES):
        print(kind, {name: f"{ms:.1f} ms" for name, ms in pieces(kind, train).items()})
    print(f"README snippet, call -> first epoch: {readme_start_up(train, val, tokenizer):.2f} s")


if __name__ == "__main__":
    main()
