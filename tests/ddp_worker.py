"""Run by tests/test_distributed.py, once under torchrun (2 processes) and once alone."""
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyCausalLM  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

VOCAB, PAD = 50, 0


def sequences(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 61, (1,), generator=g)),), generator=g) for _ in range(n)]


def main(out_dir: str, batch_size: int) -> None:
    rank = int(__import__("os").environ.get("RANK", 0))
    train, val = sequences(37, seed=1), sequences(13, seed=2)  # neither divisible by 2 or by 8
    runs = {"ordered": dict(shuffle=False, group_by_length=False),
            "shuffled_lines": dict(shuffle=True, group_by_length="lines"),
            "shuffled_grouped": dict(shuffle=True, group_by_length="tokens"),
            # One epoch with checkpoints, then a second call that resumes and trains to 2 epochs.
            "resumed": dict(shuffle=True, group_by_length="tokens", n_epochs=1, checkpoint_every=1),
            "resumed ": dict(shuffle=True, group_by_length="tokens", resume_from_checkpoint=True)}
    for name, options in runs.items():
        name = name.strip()
        torch.manual_seed(0)
        model = TinyCausalLM(vocab_size=VOCAB)
        options = dict(dict(n_epochs=2), **options)
        # The ordered run gives rank 1 a folder of its own: if rank 1 wrote anything, that folder would exist.
        output_dir = f"{out_dir}/{name}-run" + (f"-rank{rank}" if name == "ordered" and rank else "")
        result = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), train, val,
                                  batch_size=batch_size, gradient_accumulation_steps=2, learning_rate=1e-2,
                                  lr_schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0, progress=False,
                                  save_plots=False, output_dir=output_dir, **options)
        if name == "resumed" and not options.get("resume_from_checkpoint"):
            # Drop the epoch-end checkpoint so that the resume starts mid-epoch, from the step before it.
            if rank == 0:
                shutil.rmtree(f"{out_dir}/{name}-run/checkpoints/step-{result['global_step']}", ignore_errors=True)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        summary = {k: result[k] for k in ("final_val_loss", "final_train_loss", "loss_history", "global_step",
                                          "resumed_from_step")}
        summary["epoch_steps"] = result["metrics_summary"]["global_step"].tolist()
        summary["val_real_tokens"] = int(result["metrics_summary"]["val/real_tokens"].iloc[-1])
        Path(f"{out_dir}/{name}-rank{rank}.json").write_text(json.dumps(summary))
        if rank == 0:
            torch.save(model.state_dict(), f"{out_dir}/{name}-weights.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
