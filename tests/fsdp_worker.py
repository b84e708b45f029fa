"""Run by tests/test_fsdp.py: ``fsdp_worker.py OUT SCENARIO`` under torchrun (2 processes, gloo) or alone.

Scenarios write ``<run>-rank<r>.json`` (results) and ``<run>-weights.pt`` (the full weights, gathered).
"""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import StopAtForward, TinyCausalLM, tiny_gpt2  # noqa: E402
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning  # noqa: E402
from utils.training.distributed import gathered_state_dict  # noqa: E402

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


def main(out: str, scenarios: str, source: str = "") -> None:
    for scenario in scenarios.split(","):
        run_scenario(out, scenario, source)


# The run that the SIGKILL interrupts, its reference, and the one-process equality share these settings. Every step
# is kept as a checkpoint, so that another number of processes can resume from any of them.
KILL_FAMILY = dict(n_epochs=3, checkpoint_every=1, keep_checkpoints=20, load_best_model_at_end=True)


def run_scenario(out: str, scenario: str, source: str) -> None:
    fsdp = "RANK" in os.environ  # under torchrun: sharded (one process included); alone: one process without FSDP
    if scenario == "equal":
        # The reference run (also the one-process equality); evaluate_perplexity on the (sharded) best weights.
        model = tiny(killable=True)
        result = fit(out, "equal", model, fsdp=fsdp, **KILL_FAMILY)
        val = evaluate_perplexity(model, VAL, CONFIG, batch_size=3)
        held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        record(out, "equal", result, model,
               {"evaluate_perplexity": val["loss"], "tokens": val["tokens"],
                "held_parameter_fraction": held / sum(p.numel() for p in model.parameters())})
        gpt2 = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=PAD)  # HF: its decoder layers are the units
        record(out, "gpt2", fit(out, "gpt2", gpt2, fsdp=fsdp, n_epochs=1, loss_path="linear"), gpt2)
        model = tiny()  # W&B (offline) with per-layer gradient statistics at every step: rank 0 alone logs
        record(out, "wandb", fit(out, "wandb", model, fsdp=fsdp, n_epochs=1, use_wandb=True, wandb_mode="offline",
                                 log_grad_dist_every=1, log_grad_histogram=True), model)
        model = tiny()  # the non-finite guard: the first update makes every weight huge, the second step is NaN
        record(out, "nan", fit(out, "nan", model, fsdp=fsdp, n_epochs=1, learning_rate=1e30, max_grad_norm=None), model)
    elif scenario == "killed":  # every process SIGKILLs itself at the same training forward, mid-epoch 2
        fit(out, "kill", tiny(int(os.environ["KILL_AT"]), killable=True), fsdp=True, **KILL_FAMILY)
        raise SystemExit("the kill did not happen")
    elif scenario == "resumed":
        model = tiny(killable=True)
        result = fit(out, "kill", model, fsdp=True, resume_from_checkpoint=True, **KILL_FAMILY)
        record(out, "resumed", result, model)
    elif scenario == "other-world":  # this number of processes resumes checkpoints of the run in ``source``
        steps = Path(source) / "equal-run" / "checkpoints"
        for name, step, epochs in (("at-resume", os.environ["AT_STEP"], 1), ("continued", os.environ["FROM_STEP"], 3)):
            model = tiny(killable=True)
            result = fit(out, name, model, fsdp=fsdp, **dict(KILL_FAMILY, n_epochs=epochs,
                                                              resume_from_checkpoint=str(steps / f"step-{step}")))
            record(out, name, result, model)
        try:  # the per-process batch size not scaled with the number of processes: refused
            fit(out, "refused", tiny(killable=True), fsdp=fsdp, batch_size=8 // WORLD * 2,
                **dict(KILL_FAMILY, resume_from_checkpoint=str(steps / f"step-{os.environ['FROM_STEP']}")))
        except ValueError as error:
            Path(f"{out}/refused-rank{RANK}.txt").write_text(str(error))
    else:
        raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    main(*sys.argv[1:])
