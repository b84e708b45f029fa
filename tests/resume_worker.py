"""Run by tests/test_checkpoints.py: an uninterrupted run, a run SIGKILLed mid-epoch, and its resume."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import ForwardWritesLM, KillableLM, StopAtForward  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

VOCAB, PAD = 50, 0
KILL_AT_FORWARD = 21  # micro-batch 21 = optimizer step 11, in the middle of epoch 2 (steps of 2 forwards)
SETTINGS = dict(n_epochs=2, batch_size=4, gradient_accumulation_steps=2, checkpoint_every=3, keep_checkpoints=2,
                shuffle=True, learning_rate=3e-3, warmup_ratio=0.2, lr_schedule="cosine", max_grad_norm=1.0,
                progress=False, save_plots=False)


def data(seed=1, n=40):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 41, (1,), generator=g)),), generator=g) for _ in range(n)]


def run(mode: str, out_dir: str, model_kind: str = "plain", **overrides) -> dict:
    torch.manual_seed(123)  # initial weights; a resume replaces them from the checkpoint
    kill_at = KILL_AT_FORWARD if mode == "killed" else None
    if model_kind == "forward_writes":  # its forward changes a frozen parameter, a buffer, a trained parameter
        model = StopAtForward(ForwardWritesLM(vocab_size=VOCAB, ballast=1 << 20, dropout=0.1), kill_at, kill=True)
    else:
        model = KillableLM(kill_at=kill_at, vocab_size=VOCAB, dropout=0.1)
    settings = dict(dict(SETTINGS, output_dir=str(Path(out_dir) / "run"), resume_from_checkpoint=mode == "resume"),
                    **overrides)  # a folder given as resume_from_checkpoint replaces True
    train = overrides.pop("train", None) or data()
    settings.pop("train", None)
    result = test_fine_tuning(model, SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD), train, data(seed=2, n=10),
                              **settings)
    torch.save(model.state_dict(), Path(out_dir) / f"{mode}-weights.pt")
    summary = {k: result[k] for k in ("final_val_loss", "final_train_loss", "loss_history", "global_step",
                                      "resumed_from_step", "resumed_from_checkpoint", "wandb_run_id")}
    summary["epochs"] = result["metrics_summary"].drop(columns=["train/real_tokens_per_sec",
                                                                "epoch_time_s"]).to_dict("list")
    (Path(out_dir) / f"{mode}.json").write_text(json.dumps(summary))
    return result


def kill_inside_checkpoint_writes(n: int) -> None:
    """SIGKILL this process at the ``n``-th file operation of a checkpoint write (a file saved, copied, a meta.json
    written, a folder fsynced after a rename): a kill while the background writer or the staging copy is busy."""
    import os
    import signal

    from utils.training.checkpoints import checkpoint

    calls = [0]

    def killing(operation):
        def operation_then_maybe_kill(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return operation(*args, **kwargs)
        return operation_then_maybe_kill

    for name in ("_save_file", "_copy_file_synced", "_write_text_synced", "_fsync_dir"):
        setattr(checkpoint, name, killing(getattr(checkpoint, name)))


if __name__ == "__main__":
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    if extra.pop("kill_inside_checkpoint_write", None):
        kill_inside_checkpoint_writes(extra.pop("kill_at_operation"))
    run(sys.argv[1], sys.argv[2], **extra)
