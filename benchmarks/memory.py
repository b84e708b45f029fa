"""Peak memory and speed of a few training steps with a GPT-2 vocabulary (50,257), each method in a fresh process.

    python benchmarks/memory.py [--steps 3] [--batch-size 16] [--seq 256] [--device cpu|cuda] [--root DIR]

Model: GPT-2 with 2 layers of 128 (dropout 0), built from a config. Data: random token ids (uniform below the
EOS/pad id, every row full length, no padding): memory depends on shapes, not on the text. Methods:
  ours, HF GPT-2            test_fine_tuning with the HF model, default loss path (results["loss_path"], its reason)
  ours, HF GPT-2, chunked   the same with loss_path="chunked": the model's logits, loss in chunks
  ours, logits-only model   test_fine_tuning with a user's nn.Module that returns only logits (chunked)
  bare loop                 AdamW, model(...).logits, F.cross_entropy over the full logits
  HF Trainer defaults       transformers.Trainer, the model's own labels= loss
Peak: on CPU the growth of the process's peak RSS (VmHWM) over its RSS after building model and data (the
peak is reset there through /proc/self/clear_refs); on CUDA torch.cuda.max_memory_allocated over the
allocation after building. Tokens/s: real training targets over the training steps' time (ours: the
package's own train/real_tokens_per_sec, which includes the validation of 16 rows in no epoch time).
``--root DIR`` imports the package from DIR in the "ours" workers (e.g. a checkout before a change).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ours_hf", "ours_hf_chunked", "ours_logits_only", "bare", "hf_trainer")
LABELS = {"ours_hf": "ours, HF GPT-2", "ours_hf_chunked": "ours, HF GPT-2, linear path off",
          "ours_logits_only": "ours, logits-only model", "bare": "bare loop, F.cross_entropy",
          "hf_trainer": "HF Trainer defaults"}
VOCAB = 50257


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakMeter:
    """Peak memory growth from now on: RSS high-water mark on CPU, allocated bytes on CUDA (MB)."""

    def __init__(self, device: str):
        import torch

        self.device = device
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass
        self.baseline = _status_kb("VmRSS") * 1024

    def growth_mb(self) -> float:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.baseline) / 2**20
        return (_status_kb("VmHWM") * 1024 - self.baseline) / 2**20


def _model(seq: int, device: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, n_positions=seq, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=VOCAB - 1, eos_token_id=VOCAB - 1,
                        bos_token_id=VOCAB - 1)
    return GPT2LMHeadModel(config).to(device)


def _rows(n: int, seq: int, seed: int):
    import torch

    return torch.randint(0, VOCAB - 1, (n, seq), generator=torch.Generator().manual_seed(seed))


def _ours(args, model, config, train, val, meter):
    import utils.training.trainer as trainer_module
    from utils.tier3_training_utilities import test_fine_tuning

    options = {}
    if args.method == "ours_hf_chunked":  # the switch under test, off
        if hasattr(trainer_module, "use_linear_loss_if_exact"):  # a checkout before the loss_path keyword (--root)
            trainer_module.use_linear_loss_if_exact = lambda *_: False
        else:
            options["loss_path"] = "chunked"
    result = test_fine_tuning(model, config, [row.tolist() for row in train], [row.tolist() for row in val],
                              n_epochs=1, batch_size=args.batch_size, learning_rate=3e-4, shuffle=False,
                              device=args.device, progress=False, save_plots=False, output_dir=tempfile.mkdtemp(),
                              **options)
    epochs = result["metrics_summary"]
    return dict(peak_mb=meter.growth_mb(), tokens_per_s=float(epochs["train/real_tokens_per_sec"].iloc[0]),
                first_loss=result["loss_history"][0], steps=result["global_step"], loss_path=result.get("loss_path"),
                reason=result.get("loss_path_reason"))


class LogitsOnly:
    """Built lazily (torch imported in the worker): a user's module whose forward returns only the logits."""

    @staticmethod
    def wrap(model):
        from torch import nn

        class UserModel(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, idx):
                return self.inner(input_ids=idx, use_cache=False).logits
        return UserModel(model)


def _bare(args, model, train, meter):
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    first_loss, tokens, start = None, 0, time.perf_counter()
    for step in range(args.steps):
        ids = train[step * args.batch_size:(step + 1) * args.batch_size].to(args.device)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = float(loss) if first_loss is None else first_loss
        tokens += ids[:, 1:].numel()
    return dict(peak_mb=meter.growth_mb(), tokens_per_s=tokens / (time.perf_counter() - start), first_loss=first_loss,
                steps=args.steps)


def _hf_trainer(args, model, train, meter):
    from transformers import Trainer, TrainingArguments, default_data_collator

    rows = [{"input_ids": r, "attention_mask": [1] * len(r), "labels": r} for r in (row.tolist() for row in train)]
    options = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                   learning_rate=3e-4, report_to="none", save_strategy="no", logging_strategy="steps", logging_steps=1,
                   use_cpu=args.device == "cpu", disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=TrainingArguments(**options), train_dataset=rows,
                      data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return dict(peak_mb=meter.growth_mb(), tokens_per_s=args.steps * args.batch_size * (args.seq - 1) / seconds,
                first_loss=losses[0] if losses else None, steps=args.steps)


def worker(args) -> dict:
    if args.root:
        sys.path.insert(0, str(Path(args.root).resolve()))
    else:
        sys.path.insert(0, str(ROOT))
    import torch

    torch.manual_seed(0)
    train, val = _rows(args.steps * args.batch_size, args.seq, seed=1), _rows(args.batch_size, args.seq, seed=2)
    model = _model(args.seq, args.device)
    meter = PeakMeter(args.device)
    if args.method.startswith("ours"):
        user_model = LogitsOnly.wrap(model) if args.method == "ours_logits_only" else model
        return _ours(args, user_model, model.config, train, val, meter)
    return _bare(args, model, train, meter) if args.method == "bare" else _hf_trainer(args, model, train, meter)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--root", default=None, help="import the package from this folder in the workers")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # set in the worker processes
    args = parser.parse_args(argv)
    if args.method:
        print("RESULT " + json.dumps(worker(args)))
        return None
    rows = {}
    for method in args.methods:
        command = [sys.executable, __file__, "--method", method, "--steps", str(args.steps), "--batch-size",
                   str(args.batch_size), "--seq", str(args.seq), "--device", args.device]
        command += ["--root", args.root] if args.root else []
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{method} failed:\n{done.stderr[-3000:]}", flush=True)
            continue
        rows[method] = json.loads(lines[-1][len("RESULT "):])
        print(f"{LABELS[method]}: {rows[method]}", flush=True)
    import torch

    print(f"\nGPT-2 2x128, vocabulary {VOCAB}, batch {args.batch_size} x {args.seq}, {args.steps} steps, device "
          f"{args.device} ({torch.get_num_threads()} threads), torch {torch.__version__}, random token ids\n")
    print("| method | loss path | peak memory growth | tokens/s | first-step loss |\n|---|---|---:|---:|---:|")
    for method, row in rows.items():
        first = "" if row.get("first_loss") is None else f"{row['first_loss']:.6f}"
        print(f"| {LABELS[method]} | {row.get('loss_path') or ''} | {row['peak_mb']:,.0f} MB | "
              f"{row['tokens_per_s']:,.0f} | {first} |")
    for mine, theirs, target in (("ours_hf", "hf_trainer", 0.4), ("ours_logits_only", "bare", 0.6)):
        if mine in rows and theirs in rows:
            ratio = rows[mine]["peak_mb"] / rows[theirs]["peak_mb"]
            print(f"{LABELS[mine]} / {LABELS[theirs]}: {ratio:.2f}x the peak (target <= {target}x)")
    for mine in ("ours_hf", "ours_hf_chunked", "ours_logits_only"):
        if mine in rows and "bare" in rows:
            relative = abs(rows[mine]["first_loss"] / rows["bare"]["first_loss"] - 1)
            print(f"first-step loss, {LABELS[mine]} vs bare loop: {relative:.1e} relative (target <= 5e-5)")
    return rows


if __name__ == "__main__":
    main()
