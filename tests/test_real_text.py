"""Real text, real tokenizer, agreement with Hugging Face Transformers (issue 3)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from models import tiny_gpt2
from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer
from utils.data.corpus import OFFLINE_SOURCE
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning

VOCAB = 2048


@pytest.fixture(scope="module")
def corpus():
    train, val = load_wikitext("train", source="offline"), load_wikitext("validation", source="offline")
    tokenizer = train_bpe_tokenizer(train.lines, vocab_size=VOCAB)
    return {"train": train, "val": val, "tokenizer": tokenizer,
            "train_examples": prepare_lm_dataset(train.lines[:320], tokenizer, max_length=128),
            "val_examples": prepare_lm_dataset(val.lines[:160], tokenizer, max_length=128)}


def _gpt2(seed=0):
    return tiny_gpt2(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=128, seed=seed)


def _exact_eval(model, examples):
    """Independent evaluator: every example alone, no padding; summed CE over shifted targets / count."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor(example["input_ids"])[None]
            logits = model(input_ids=ids).logits
            total += F.cross_entropy(logits[0, :-1].double(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count, count


def _hf_collate(tokenizer, examples):
    batch = tokenizer.pad([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in examples],
                          return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # mask, not id: real EOS stays
    return batch, labels


def test_offline_corpus_is_real_wikipedia_with_disjoint_splits(corpus):
    train, val = corpus["train"], corpus["val"]
    assert train.source == OFFLINE_SOURCE
    assert len(train) > 3000 and len(val) > 300
    assert sum(len(line.split()) for line in train) > 200_000
    assert not set(train.lines) & set(val.lines)
    assert all("[[" not in line and "'''" not in line for line in train.lines[:500])
    assert load_wikitext("validation", source="offline").lines == val.lines  # deterministic


def test_tokenizer_is_gpt2_style(corpus):
    tokenizer = corpus["tokenizer"]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == VOCAB - 1 == len(tokenizer) - 1
    text = corpus["val"].lines[0]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    lengths = [len(e["input_ids"]) for e in corpus["val_examples"]]
    assert min(lengths) < 40 and max(lengths) == 128  # variable lengths, truncated
    ends_with_eos = [e["input_ids"][-1] == tokenizer.eos_token_id for e in corpus["val_examples"]]
    assert 0 < sum(ends_with_eos) < len(ends_with_eos)  # truncated lines do not end with EOS


def test_perplexity_matches_exact_evaluation_and_hugging_face(corpus):
    model, tokenizer, examples = _gpt2(), corpus["tokenizer"], corpus["val_examples"]
    ours = evaluate_perplexity(model, examples, tokenizer=tokenizer, batch_size=16)
    exact_loss, exact_count = _exact_eval(model, examples)
    assert ours["pad_token_id"] == VOCAB - 1
    assert ours["tokens"] == exact_count
    assert ours["loss"] == pytest.approx(exact_loss, rel=1e-5)
    assert ours["perplexity"] == pytest.approx(math.exp(exact_loss), rel=1e-5)

    # Hugging Face's own loss (mean over the batch's real shifted labels), token-weighted across batches.
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            batch, labels = _hf_collate(tokenizer, examples[start:start + 16])
            hf_loss = model(**batch, labels=labels).loss.item()
            n = int((labels[:, 1:] != -100).sum())
            total, count = total + hf_loss * n, count + n
    assert count == exact_count
    assert ours["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_real_eos_sharing_pad_id_counts_only_where_real(corpus):
    tokenizer, examples = corpus["tokenizer"], corpus["val_examples"][:24]
    eos = tokenizer.eos_token_id
    result = evaluate_perplexity(_gpt2(), examples, tokenizer=tokenizer, batch_size=8)
    real_targets = sum(len(e["input_ids"]) - 1 for e in examples)  # includes each real final EOS
    real_eos = sum(e["input_ids"][-1] == eos for e in examples)
    assert real_eos > 0 and result["tokens"] == real_targets
    assert result["padded_tokens"] > 0  # padding with the same id was present and not counted


def test_one_epoch_matches_hugging_face_trainer(corpus, tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer, train_examples, val_examples = corpus["tokenizer"], corpus["train_examples"], corpus["val_examples"]
    initial = _gpt2(seed=1)
    ours_model, hf_model = copy.deepcopy(initial), copy.deepcopy(initial)
    lr, batch_size = 2e-3, 8

    ours = test_fine_tuning(ours_model, ours_model.config, train_examples, val_examples, n_epochs=1, learning_rate=lr,
                            batch_size=batch_size, weight_decay=0.0, max_grad_norm=1.0, lr_schedule="constant",
                            warmup_ratio=0.0, shuffle=False, group_by_length=False, tokenizer=tokenizer, progress=False,
                            save_plots=False)

    args = TrainingArguments(output_dir=str(tmp_path / "hf"), num_train_epochs=1,
                             per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
                             learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="constant",
                             warmup_steps=0, train_sampling_strategy="sequential", report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=1,
                             dataloader_drop_last=False)
    trainer = Trainer(model=hf_model, args=args, train_dataset=train_examples, eval_dataset=val_examples,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    hf_reported = trainer.evaluate()["eval_loss"]

    # An independent correct loop: same batches, AdamW, clipping; loss = masked CE sum / real targets.
    loop_model = copy.deepcopy(initial).train()
    optimizer = torch.optim.AdamW(loop_model.parameters(), lr=lr, weight_decay=0.0)
    for start in range(0, len(train_examples), batch_size):
        batch, labels = _hf_collate(tokenizer, train_examples[start:start + batch_size])
        logits = loop_model(**batch).logits[:, :-1]
        targets = labels[:, 1:]
        loss = (F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100, reduction="sum")
                / (targets != -100).sum())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(loop_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    loop_exact, _ = _exact_eval(loop_model, val_examples)

    initial_loss, _ = _exact_eval(initial, val_examples)
    ours_exact, _ = _exact_eval(ours_model, val_examples)
    hf_exact, _ = _exact_eval(hf_model, val_examples)
    print(f"\ninitial {math.exp(initial_loss):.2f} | ours {ours['val_perplexity']:.3f} "
          f"(exact {math.exp(ours_exact):.3f}) | independent loop {math.exp(loop_exact):.3f} | "
          f"HF Trainer model, exact {math.exp(hf_exact):.3f} | Trainer.evaluate() reports {math.exp(hf_reported):.3f}")
    assert ours_exact < initial_loss - 0.5  # it learned
    assert ours["final_val_loss"] == pytest.approx(ours_exact, rel=1e-5)  # our report is the exact number
    assert math.exp(ours_exact) == pytest.approx(math.exp(loop_exact), rel=0.01)
    assert math.exp(ours_exact) == pytest.approx(math.exp(hf_exact), rel=0.05)
    assert abs(hf_reported - hf_exact) > 1e-3  # HF's report is not the exact token-weighted loss


def test_a_tokenizers_batch_output_is_accepted_as_data(corpus):
    tokenizer, lines = corpus["tokenizer"], corpus["val"].lines[:12]
    encoded = tokenizer(lines, truncation=True, max_length=64, padding=True)  # columns, padded, with masks
    model = _gpt2()
    from_columns = evaluate_perplexity(model, encoded, tokenizer=tokenizer, batch_size=4)
    exact_loss, count = _exact_eval(model, [{"input_ids": tokenizer(line, truncation=True, max_length=64)["input_ids"]}
                                            for line in lines])
    assert from_columns["tokens"] == count and from_columns["loss"] == pytest.approx(exact_loss, rel=1e-5)
