"""Writes training.ipynb from the cells below (edit here, run `python scripts/make_notebook.py`, re-run the test).

Keeping the cells in a Python file keeps notebook diffs readable and the committed notebook free of outputs.
"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# Fine-tune your own language model — padding never counts

This notebook fine-tunes a causal language model on Wikipedia text with `utils.tier3_training_utilities`:
padding positions never enter the loss, the gradients, the accuracy or the perplexity, and every loss is
token-weighted. It runs top to bottom in Colab (GPU or not) and headless on a CPU.

On a GPU it uses real sizes (a GPT-2-small-shaped model, a few thousand lines, several epochs); on a CPU, or
with `TIER3_NOTEBOOK_QUICK=1`, a tiny model and one epoch (a few minutes)."""),
    ("md", """## 1. Set-up
In Colab the first cell installs the package from its repository (set `REPO_URL` to your copy). Elsewhere it
uses the installed package (`bash scripts/setup_env.sh` in a clone). **Do not keep a file named `utils.py`
beside this notebook**: it would shadow the package's `utils` folder."""),
    ("code", """import os
import sys
import subprocess

IN_COLAB = "google.colab" in sys.modules
REPO_URL = os.environ.get("TIER3_REPO_URL", "https://github.com/YOUR-ORG/tier3-training-utilities.git")
if IN_COLAB:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUICK = os.environ.get("TIER3_NOTEBOOK_QUICK") == "1" or DEVICE == "cpu"
gpu = f" ({torch.cuda.get_device_name()})" if DEVICE == "cuda" else ""
print(f"torch {torch.__version__} | device {DEVICE}{gpu} | {'quick sizes' if QUICK else 'full sizes'}")"""),
    ("md", """## 2. Data
Real Wikipedia text that ships inside a dependency (gensim), read without the network; pass `source="hub"` to
`load_wikitext` for WikiText-2 through `datasets` (the next line says which was used). A GPT-2-style byte-level BPE tokenizer is trained on the
training text (pad id = EOS id, as GPT-2), and `prepare_lm_dataset` tokenizes each line with an attention mask."""),
    ("code", """from utils.data import load_wikitext, prepare_lm_dataset, train_bpe_tokenizer

train_text, val_text = load_wikitext("train"), load_wikitext("validation")
print("text:", train_text.source)
N_TRAIN, N_VAL, MAX_LEN, VOCAB = (400, 100, 64, 1024) if QUICK else (5000, 500, 256, 8192)
tokenizer = train_bpe_tokenizer(train_text.lines, vocab_size=VOCAB)
train_data = prepare_lm_dataset(train_text.lines[:N_TRAIN], tokenizer, max_length=MAX_LEN)
val_data = prepare_lm_dataset(val_text.lines[:N_VAL], tokenizer, max_length=MAX_LEN)
print(f"{len(train_data)} training / {len(val_data)} validation lines, vocabulary {len(tokenizer)}, "
      f"pad id {tokenizer.pad_token_id}")"""),
    ("md", """## 3. Model
A GPT-2 built from a `transformers` config (random weights: nothing is downloaded)."""),
    ("code", """from transformers import GPT2Config, GPT2LMHeadModel

shape = dict(n_embd=64, n_layer=2, n_head=2) if QUICK else dict(n_embd=768, n_layer=12, n_head=12)
config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_LEN, pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)


def new_model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


model = new_model()
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")"""),
    ("md", """### ▶ Plug in your own model here
Any `nn.Module` whose forward takes token ids `(batch, seq)` and returns logits `(batch, seq, vocab)` works
(a tuple, dict or `ModelOutput` holding them too). Its config needs `vocab_size` and `pad_token_id`;
`max_position_embeddings` lets the package check line lengths against the model before training.
Set `USE_OWN_MODEL = True` to train the small example below instead of GPT-2."""),
    ("code", """from types import SimpleNamespace

USE_OWN_MODEL = False


class MyCausalLM(torch.nn.Module):
    def __init__(self, vocab_size, d_model=64, n_layers=2, n_heads=2, max_len=MAX_LEN):
        super().__init__()
        self.embed, self.pos = torch.nn.Embedding(vocab_size, d_model), torch.nn.Embedding(max_len, d_model)
        layer = torch.nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, n_layers)
        self.head = torch.nn.Linear(d_model, vocab_size)

    def forward(self, input_ids):
        seq = input_ids.shape[1]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(seq, device=input_ids.device)
        hidden = self.embed(input_ids) + self.pos(torch.arange(seq, device=input_ids.device))
        return self.head(self.blocks(hidden, mask=causal, is_causal=True))


if USE_OWN_MODEL:
    config = SimpleNamespace(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=MAX_LEN)
    new_model = lambda: MyCausalLM(len(tokenizer))  # noqa: E731
    model = new_model()"""),
    ("md", """## 4. Why padding matters, measured on this data
A naive loop batches random lines, pads them to the longest, and averages the cross-entropy over every position,
padding included. Here two copies of the same model train for the same steps on the same batches with the same
optimizer; the only difference is the loss: the naive one counts padding, the other is this package's
(`masked_lm_loss`: real target tokens only). Then each model is measured both ways. The cell prints:
- the share of the naive batches that is padding, and the share of the naive loss that is "predict padding";
- for each model, the perplexity the naive loop would report and its real perplexity on real tokens
  (the number the package reports): the naive loop's own number flatters its model, because predicting the
  padding that follows a line's end is nearly free;
- how likely each model says "end of line" (EOS) where a line ends and where it goes on."""),
    ("code", """import inspect
import math

import matplotlib.pyplot as plt
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from utils.tier3_training_utilities import evaluate_perplexity
from utils.training.loss import masked_lm_loss

BATCH = 16
PAD, EOS = tokenizer.pad_token_id, tokenizer.eos_token_id
PADDING_STEPS = 75 if QUICK else 300


def padded_batches(data, seed):
    \"\"\"Random batches padded to their longest line, as a naive loop builds them (and their attention masks).\"\"\"
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    for start in range(0, len(order), BATCH):
        rows = [torch.tensor(data[i]["input_ids"]) for i in order[start:start + BATCH]]
        ids = pad_sequence(rows, batch_first=True, padding_value=PAD)
        mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], batch_first=True)
        yield ids.to(DEVICE), mask.to(DEVICE)


def logits_of(model, ids, mask):
    takes_mask = "attention_mask" in inspect.signature(model.forward).parameters
    out = model(input_ids=ids, attention_mask=mask) if takes_mask else model(ids)
    return (out if torch.is_tensor(out) else out.logits).float()


def naive_loss(logits, ids, mask):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())  # every position, padding too


def package_loss(logits, ids, mask):
    sums = masked_lm_loss(logits, ids, None, mask, PAD)
    return sums.loss_sum / sums.real_targets.clamp(min=1)


def train_copy(loss_fn):
    model = new_model().to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step, epoch = 0, 0
    while step < PADDING_STEPS:
        for ids, mask in padded_batches(train_data, seed=epoch):
            loss = loss_fn(logits_of(model, ids, mask), ids, mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == PADDING_STEPS:
                break
        epoch += 1
    return model.eval()


def measure(model):
    \"\"\"Naive and real loss on the validation lines, the padding's share, P(EOS) at line ends and mid-line.\"\"\"
    sums = dict(all=0.0, positions=0, padding=0.0, pad_positions=0, eos_end=0.0, ends=0, eos_mid=0.0, mids=0)
    with torch.no_grad():
        for ids, mask in padded_batches(val_data, seed=0):
            logits = logits_of(model, ids, mask)[:, :-1]
            targets = ids[:, 1:]
            token_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
            real = (mask[:, 1:] * mask[:, :-1]).bool()  # the target and the position predicting it are real
            p_eos = torch.softmax(logits, -1)[..., EOS]
            line_end = real & (targets == EOS)
            sums["all"] += token_loss.sum().item()
            sums["positions"] += targets.numel()
            sums["padding"] += token_loss[~real].sum().item()
            sums["pad_positions"] += int((~real).sum())
            sums["eos_end"] += p_eos[line_end].sum().item()
            sums["ends"] += int(line_end.sum())
            sums["eos_mid"] += p_eos[real & ~line_end].sum().item()
            sums["mids"] += int((real & ~line_end).sum())
    real_ppl = evaluate_perplexity(model, val_data, config, batch_size=BATCH, tokenizer=tokenizer, device=DEVICE)["perplexity"]
    return {"naive_ppl": math.exp(sums["all"] / sums["positions"]), "real_ppl": real_ppl,
            "pad_share_of_positions": sums["pad_positions"] / sums["positions"],
            "pad_share_of_naive_loss": sums["padding"] / sums["all"],
            "p_eos_line_end": sums["eos_end"] / max(sums["ends"], 1), "p_eos_mid_line": sums["eos_mid"] / max(sums["mids"], 1)}


naive_model, package_model = train_copy(naive_loss), train_copy(package_loss)
naive, exact = measure(naive_model), measure(package_model)
print(f"{PADDING_STEPS} steps each, batches of {BATCH} random validation lines: "
      f"{naive['pad_share_of_positions']:.1%} of the positions a naive loss averages over are padding")
print(f"share of the naive-trained model's naive loss that is 'predict padding': {naive['pad_share_of_naive_loss']:.1%}")
print(f"{'':34}{'naive loss':>12}{'this package':>14}")
print(f"{'perplexity the naive loop reports':34}{naive['naive_ppl']:12.1f}{exact['naive_ppl']:14.1f}")
print(f"{'real perplexity (excl. padding)':34}{naive['real_ppl']:12.1f}{exact['real_ppl']:14.1f}")
print(f"{'P(EOS) where a line ends':34}{naive['p_eos_line_end']:12.4f}{exact['p_eos_line_end']:14.4f}")
print(f"{'P(EOS) where the line goes on':34}{naive['p_eos_mid_line']:12.4f}{exact['p_eos_mid_line']:14.4f}")
print(f"The naive loop reports perplexity {naive['naive_ppl']:.1f} for its model; on real tokens that model's "
      f"perplexity is {naive['real_ppl']:.1f}, {naive['real_ppl'] / naive['naive_ppl']:.2f}x the reported number.")
gap = naive["real_ppl"] / exact["real_ppl"] - 1
print(f"On real tokens the naive-trained model is {abs(gap):.1%} {'worse' if gap > 0 else 'better'} than the other "
      f"({naive['real_ppl']:.1f} vs {exact['real_ppl']:.1f}): {'a small' if abs(gap) < 0.05 else 'a real'} difference "
      "in the model itself.")
for where, key in (("where a line ends", "p_eos_line_end"), ("where the line goes on", "p_eos_mid_line")):
    ratio = naive[key] / max(exact[key], 1e-12)
    print(f"P(EOS) {where}: naive-trained {naive[key]:.4f}, the other {exact[key]:.4f} ({ratio:.1f}x).")"""),
    ("md", """What the numbers show (the printed lines say which way each comparison went on this run):
- **The reported number.** The first row is what a naive loop logs: padding after a line's end is nearly free to
  predict, so averaging over it flatters the model. Its real perplexity (second row) is well above what it reported.
  This is the effect that always matters: a naive loop's numbers cannot be compared with anyone else's.
- **The model itself.** Compare the two columns of the second row: on ordinary tokens the two models usually end
  close (the padding targets are easy, so they add little gradient), and either may come out slightly ahead.
- **Where it matters for the model: pad == EOS.** With GPT-2's convention the padding *is* the EOS token, so the
  naive loss also trains "EOS follows EOS", over and over. The P(EOS) lines show how that shifts the model's
  line endings: a model that says EOS where a line goes on stops its generations early; one that never learned
  EOS (padding masked by id, a different mistake) never stops. This package counts each line's real EOS once and
  never the padding after it."""),
    ("code", """figure, axis = plt.subplots(figsize=(7, 4))
positions = [0, 1]
reported = axis.bar([x - 0.2 for x in positions], [naive["naive_ppl"], exact["naive_ppl"]], width=0.4,
                    label="what a naive loop reports (padding counted)")
real = axis.bar([x + 0.2 for x in positions], [naive["real_ppl"], exact["real_ppl"]], width=0.4,
                label="real perplexity (excl. padding)")
for bars in (reported, real):
    axis.bar_label(bars, fmt="%.0f")
axis.set_xticks(positions, ["model trained with\\nthe naive loss", "model trained with\\nthis package's loss"])
axis.set_ylabel("validation perplexity")
axis.set_title(f"The same two models, measured both ways ({PADDING_STEPS} training steps each)")
axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)  # below the axes, never over the bars
figure.tight_layout()
plt.show()"""),
    ("md", """## 5. Fine-tune
W&B is used when a key is present (a Colab secret named `WANDB_API_KEY`, or the environment variable); otherwise
it is off — never a login prompt. In Colab the run writes to Google Drive with a checkpoint every 200 steps and
`resume_from_checkpoint=True`: **after a disconnect, run the notebook again and training continues where it stopped.**"""),
    ("code", """from utils.tier3_training_utilities import test_fine_tuning

wandb_key = os.environ.get("WANDB_API_KEY")
if IN_COLAB and not wandb_key:
    try:
        from google.colab import userdata

        wandb_key = userdata.get("WANDB_API_KEY")
        os.environ["WANDB_API_KEY"] = wandb_key
    except Exception:  # no secret stored, or notebook access not granted
        wandb_key = None
if IN_COLAB:
    from google.colab import drive

    drive.mount("/content/drive")
    OUTPUT_DIR = "/content/drive/MyDrive/tier3-runs/notebook"
else:
    OUTPUT_DIR = os.path.join("outputs", "notebook")

results = test_fine_tuning(
    model, config, train_data, val_data, n_epochs=1 if QUICK else 3, learning_rate=1e-3 if QUICK else 3e-4,
    batch_size=BATCH, tokenizer=tokenizer, device=DEVICE, output_dir=OUTPUT_DIR,
    use_wandb=bool(wandb_key), wandb_project="tier3-notebook",
    checkpoint_every=200 if IN_COLAB else None, resume_from_checkpoint=IN_COLAB)"""),
    ("md", """## 6. Results
One row per epoch (losses exclude padding); the plots are saved under `OUTPUT_DIR` as well."""),
    ("code", """columns = ["epoch", "train/loss_excl_padding", "val/loss_excl_padding", "val/perplexity", "train/pad_fraction",
           "train/real_tokens_per_sec"]
results["metrics_summary"][columns]"""),
    ("code", """exact_after = evaluate_perplexity(model, val_data, config, batch_size=BATCH, tokenizer=tokenizer, device=DEVICE)
exact_before = evaluate_perplexity(new_model(), val_data, config, batch_size=BATCH, tokenizer=tokenizer, device=DEVICE)
print(f"validation perplexity excl. padding: {exact_before['perplexity']:.1f} before -> {exact_after['perplexity']:.1f} after")"""),
    ("code", """def sample(model, prompt, new_tokens=30, temperature=0.8, top_k=20):
    \"\"\"Top-k sampling with plain logits, so it works for any model this notebook trains.\"\"\"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=DEVICE)
    model.eval()
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(ids[:, -MAX_LEN:])
            logits = (out if torch.is_tensor(out) else out.logits)[0, -1].float() / temperature
            top = torch.topk(logits, top_k)  # a byte-level model's rare byte tokens would break the text apart
            next_id = top.indices[torch.multinomial(torch.softmax(top.values, -1), 1)]
            if next_id.item() == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, next_id[None]], dim=1)
    text = tokenizer.decode(ids[0])
    if "\\ufffd" in text:  # sampled bytes that do not form UTF-8 characters: show the tokens instead
        return f"(not valid text; token ids) {ids[0].tolist()}"
    return text


torch.manual_seed(0)
print(sample(model, "The history of"))"""),
    ("md", """## 7. A small search over the model's size and the learning rate
Optuna searches how deep and how wide the model is (`model_space`: each trial's model parameters, passed to the
factory as a dict) and the learning rate (`search_space`: `test_fine_tuning` keywords). Two objectives: the
validation loss excluding padding and the parameter count; `search["pareto"]` holds the trials no other trial
beats on both (is the bigger model worth its size?), and `search_pareto.png` draws them. Every trial also reports
the real tokens it trained, its training time, a FLOPs estimate (6 x parameters x tokens) and its validation bits
per byte (comparable across tokenizers).
The study lives in SQLite next to the outputs: re-running the cell adds trials with new parameters (also after a
disconnect). Changing the search space, `N_EPOCHS`, the data or the model family needs a new `study_name`
(the call says so; `USE_OWN_MODEL` picks its own study).
SQLite suits this one notebook; several Colab sessions searching one study at once need a `postgresql://` URL
(see the README's storage table). Trials write to `OUTPUT_DIR/search/<study_name>/trial-N`."""),
    ("code", """from utils.tier3_training_utilities import test_hyperparameter_search

MODEL_SPACE = {"n_layer": [1, 2], "n_embd": [32, 64]} if QUICK else {"n_layer": ("int", 4, 12), "n_embd": [384, 768]}


def sized_model(params):  # the trial's model parameters -> the model they describe
    torch.manual_seed(0)
    if USE_OWN_MODEL:
        return MyCausalLM(len(tokenizer), d_model=params["n_embd"], n_layers=params["n_layer"])
    return GPT2LMHeadModel(GPT2Config(**dict(config.to_dict(), **params)))


search = test_hyperparameter_search(
    sized_model, config, train_data, val_data, n_trials=3 if QUICK else 12, n_epochs=1,
    model_space=MODEL_SPACE, search_space={"learning_rate": (1e-4, 3e-3)}, objectives=("val_loss", "n_parameters"),
    batch_size=BATCH, storage=f"sqlite:///{OUTPUT_DIR}/search.db",
    study_name="notebook-size-search-own-model" if USE_OWN_MODEL else "notebook-size-search", tokenizer=tokenizer,
    device=DEVICE, output_dir=os.path.join(OUTPUT_DIR, "search"))
print("best:", search["best_model_params"], search["best_params"], f"val perplexity {search['best_val_perplexity']:.1f}")
columns = ["number", "state", "params_n_layer", "params_n_embd", "params_learning_rate", "n_parameters",
           "train_real_tokens", "train_seconds", "flops_estimate", "val_loss", "val_bits_per_byte"]
search["trials"][columns]"""),
    ("code", """search["pareto"][columns]  # the trials no other trial beats on both loss and size"""),
]


def main() -> None:
    notebook = new_notebook(cells=[new_markdown_cell(text) if kind == "md" else new_code_cell(text) for kind, text in CELLS])
    notebook.metadata.update({"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                              "language_info": {"name": "python"}, "accelerator": "GPU",
                              "colab": {"provenance": [], "gpuType": "T4"}})
    path = Path(__file__).resolve().parent.parent / "training.ipynb"
    nbformat.write(notebook, path)
    print(f"wrote {path.name} ({len(CELLS)} cells)")


if __name__ == "__main__":
    main()
