"""Run by tests/test_fsdp.py: ``fsdp_worker.py OUT SCENARIO`` under torchrun (2 processes, gloo) or alone.

Scenarios write ``<run>-rank<r>.json`` (results) and ``<run>-weights.pt`` (the full weights, gathered).
"""
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import StopAtForward, TinyCausalLM, tiny_gpt2  # noqa: E402
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning  # noqa: E402
from utils.training.fsdp import gathered_state_dict  # noqa: E402

VOCAB, PAD = 50, 0
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
# The same global batch on any number of processes: 8 lines per micro-batch in all.
COMMON = dict(gradient_accumulation_steps=2, learning_rate=1e-2, lr_schedule="constant", warmup_ratio=0.0,
              max_grad_norm=1.0, progress=False, save_plots=False, shuffle=True, group_by_length="tokens")


def sequences(n, seed, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(torch.randint(2, 41, (1,), generator=g)),), generator=g) for _ in range(n)]


TRAIN, VAL = sequences(45, seed=1), sequences(13, seed=2)  # neither divisible by 2 or by 8


def record(out, name, result, model, extra=None):
    summary = {k: result[k] for k in ("final_val_loss", "loss_history", "global_step", "resumed_from_step", "loss_path",
                                      "best_epoch", "non_finite", "stop_reason")}
    summary["val_history"] = result["metrics_summary"]["val/loss_excl_padding"].tolist()
    summary.update(extra or {})
    weights = gathered_state_dict(model)  # a collective: every process takes part
    Path(f"{out}/{name}-rank{RANK}.json").write_text(json.dumps(summary))
    if RANK == 0:
        torch.save(weights, f"{out}/{name}-weights.pt")


def fit(out, name, model, *, fsdp, **options):
    options = dict(dict(COMMON, n_epochs=2, batch_size=8 // WORLD, output_dir=f"{out}/{name}-run"), **options)
    return test_fine_tuning(model, CONFIG, TRAIN, VAL, fsdp=fsdp, **options)


def tiny(kill_at=None, killable=False):
    """Two blocks (two FSDP units and the root); ``killable``: wrapped to SIGKILL its process at forward ``kill_at``."""
    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=VOCAB, n_layers=2)
    return StopAtForward(model, kill_at, kill=True) if killable else model


def main(out: str, scenarios: str) -> None:
    for scenario in scenarios.split(","):
        run_scenario(out, scenario)


def run_scenario(out: str, scenario: str) -> None:
    fsdp = torch.distributed.is_available() and "RANK" in os.environ  # torchrun: sharded; alone: one process, no FSDP
    if scenario == "equal":
        # Equality with one process; evaluate_perplexity on the (sharded) best weights; HF GPT-2; the non-finite guard.
        model = tiny()
        result = fit(out, "equal", model, fsdp=fsdp, load_best_model_at_end=True, n_epochs=3)
        val = evaluate_perplexity(model, VAL, CONFIG, batch_size=3)
        record(out, "equal", result, model, {"evaluate_perplexity": val["loss"], "tokens": val["tokens"]})
        gpt2 = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=PAD)
        record(out, "gpt2", fit(out, "gpt2", gpt2, fsdp=fsdp, n_epochs=1), gpt2)
        model = tiny()
        record(out, "nan", fit(out, "nan", model, fsdp=fsdp, n_epochs=1, learning_rate=1e30, max_grad_norm=None), model)
    elif scenario == "uninterrupted":
        model = tiny(killable=True)
        record(out, "reference", fit(out, "reference", model, fsdp=True, checkpoint_every=1), model)
    elif scenario == "killed":  # both processes SIGKILL themselves at the same training forward, mid-epoch 2
        fit(out, "kill", tiny(int(os.environ["KILL_AT"]), killable=True), fsdp=True, checkpoint_every=1)
        raise SystemExit("the kill did not happen")
    elif scenario == "resumed":
        model = tiny(killable=True)
        record(out, "resumed", fit(out, "kill", model, fsdp=True, checkpoint_every=1, resume_from_checkpoint=True), model)
    elif scenario == "one-epoch":  # the first epoch with checkpoints, for a resume on another number of processes
        model = tiny()
        record(out, "one-epoch", fit(out, "one-epoch", model, fsdp=fsdp, checkpoint_every=3, n_epochs=1), model)
    elif scenario == "other-world":  # this process count resumes the one-epoch run's checkpoint of epoch 1
        source = Path(f"{out}/one-epoch-run")
        for name, epochs in (("at-resume", 1), ("continued", 2)):
            if RANK == 0:
                shutil.rmtree(f"{out}/{name}-run", ignore_errors=True)
                shutil.copytree(source, f"{out}/{name}-run")
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            model = tiny()
            record(out, name, fit(out, name, model, fsdp=fsdp, n_epochs=epochs, resume_from_checkpoint=True), model)
        try:  # the per-process batch size not scaled with the number of processes: refused
            newest = max((source / "checkpoints").glob("step-*"), key=lambda folder: int(folder.name[len("step-"):]))
            fit(out, "refused", tiny(), fsdp=fsdp, batch_size=8 // WORLD * 2, resume_from_checkpoint=str(newest))
        except ValueError as error:
            Path(f"{out}/refused-rank{RANK}.txt").write_text(str(error))
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
