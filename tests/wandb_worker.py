"""Run by tests/test_wandb_rows.py: an offline W&B run with default logging, optionally SIGKILLed at a training
forward."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import KillableLM  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

VOCAB, PAD = 50, 0
# 40 lines, batch 4, 9 epochs: 13 token-budget steps per epoch, 117 steps; every logging setting at its default.
SETTINGS = dict(n_epochs=9, batch_size=4, learning_rate=1e-3, use_wandb=True, wandb_mode="offline", progress=False,
                save_plots=False, wandb_project="tests", wandb_run_name="rows", log_grad_histogram=True)


def data(seed, n):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g) for _ in range(n)]


if __name__ == "__main__":
    out_dir, kill_at, extra = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(0)
    settings = dict(SETTINGS, output_dir=str(out_dir / "run"), **extra)
    result = test_fine_tuning(KillableLM(kill_at), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD),
                              data(1, 40), data(2, 8), **settings)
    (out_dir / "result.json").write_text(json.dumps({"global_step": result["global_step"],
                                                     "wandb_run_id": result["wandb_run_id"],
                                                     "resumed_from_step": result["resumed_from_step"],
                                                     "epoch_ends": result["metrics_summary"]["global_step"].tolist()}))
