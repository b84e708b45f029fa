"""Our perplexity vs an exact evaluator vs Hugging Face Trainer, and why Trainer.evaluate() differs.

    python benchmarks/hf_agreement.py

Same setting as tests/test_real_text.py::test_one_epoch_matches_hugging_face_trainer: tiny GPT-2
(2 layers, 64 dims, dropout 0), offline Wikipedia, BPE vocab 2048 whose <|endoftext|> is EOS and PAD,
320 training / 160 validation lines, one epoch, batch 8, constant LR 2e-3, clipping 1.0, same order.
"""
from __future__ import annotations

import copy
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402
from utils.training.loss import masked_lm_loss  # noqa: E402


def tiny_gpt2(vocab, seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=2, n_positions=128, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1))


def per_example_sums(model, examples, eos=None):
    """(loss sum, target count) per example, alone and unpadded; eos=id drops EOS targets (HF collator's view)."""
    out = []
    model.eval()
    with torch.no_grad():
        for e in examples:  # one sequence at a time: no padding anywhere, so nothing to mask but EOS
            ids = torch.tensor(e["input_ids"])[None]
            labels = ids.masked_fill(ids == eos, -100) if eos is not None else ids
            stats = masked_lm_loss(model(input_ids=ids).logits.double(), ids, labels, torch.ones_like(ids))
            out.append((stats.loss_sum.item(), int(stats.real_targets)))
    return out


def main():
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = train_bpe_tokenizer(load_wikitext("train", source="offline").lines, vocab_size=2048)
    train = prepare_lm_dataset(load_wikitext("train", source="offline").lines[:320], tokenizer, max_length=128)
    val = prepare_lm_dataset(load_wikitext("validation", source="offline").lines[:160], tokenizer, max_length=128)
    initial = tiny_gpt2(2048, seed=1)
    ours_model, hf_model = copy.deepcopy(initial), copy.deepcopy(initial)
    ours = test_fine_tuning(ours_model, ours_model.config, train, val, n_epochs=1, learning_rate=2e-3, batch_size=8,
                            weight_decay=0.0, lr_schedule="constant", warmup_ratio=0.0, shuffle=False, group_by_length=False,
                            tokenizer=tokenizer, progress=False, save_plots=False, output_dir=tempfile.mkdtemp())
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), num_train_epochs=1, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=2e-3, weight_decay=0.0, max_grad_norm=1.0,
                             lr_scheduler_type="constant", train_sampling_strategy="sequential", report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=hf_model, args=args, train_dataset=train, eval_dataset=val,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    reported = trainer.evaluate()["eval_loss"]

    eos = tokenizer.eos_token_id
    exact = lambda sums: sum(s for s, _ in sums) / sum(n for _, n in sums)  # noqa: E731
    ours_exact, hf_exact = exact(per_example_sums(ours_model, val)), exact(per_example_sums(hf_model, val))
    hf_no_eos = per_example_sums(hf_model, val, eos=eos)
    batches = [hf_no_eos[i:i + 8] for i in range(0, len(hf_no_eos), 8)]
    batch_means = [(exact(b), len(b)) for b in batches]
    mean_of_means = sum(m * k for m, k in batch_means) / sum(k for _, k in batch_means)
    # Trainer also divides each batch's loss sum by its label count taken BEFORE the causal shift
    # (num_items_in_batch): one extra, never-predicted position per sequence.
    unshifted = [sum(s for s, _ in b) / sum(n + 1 for _, n in b) for b in batches]
    unshifted_mean = sum(m * len(b) for m, b in zip(unshifted, batches)) / len(hf_no_eos)
    rows = [
        ("ours: test_fine_tuning's val perplexity", ours["val_perplexity"]),
        ("ours: exact evaluator on our model", math.exp(ours_exact)),
        ("HF Trainer's model: exact evaluator", math.exp(hf_exact)),
        ("HF Trainer's model: exact, EOS targets dropped", math.exp(exact(hf_no_eos))),
        ("HF Trainer's model: EOS dropped + batch means weighted by batch size", math.exp(mean_of_means)),
        ("... + divided by the label count before the shift (+1 per line)", math.exp(unshifted_mean)),
        ("HF Trainer.evaluate() eval_loss, exp", math.exp(reported)),
    ]
    print("| quantity | perplexity |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    return rows


if __name__ == "__main__":
    main()
