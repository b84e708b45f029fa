"""Run by tests/test_metric_rows.py: a run that evaluates and checkpoints mid-epoch, optionally SIGKILLed at a training
forward; writes its results' rows to ``<mode>.json``."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import KillableLM, random_lines  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

# 60 lines in the given order, batch 4: 15 steps an epoch, 30 in all; a forward is a step. Checkpoints at 10, 15, 20
# and 30, evaluations every 4 steps (20 too), step rows read every 3.
SETTINGS = dict(n_epochs=2, batch_size=4, shuffle=False, checkpoint_every=10, eval_every=4, log_every=3,
                keep_checkpoints=2, learning_rate=3e-3, progress=False, save_plots=False)
TIMING = ["train/step_real_tokens_per_sec", "train/real_tokens_per_sec", "epoch_time_s"]


def main(mode: str, out_dir: Path, kill_at) -> None:
    torch.manual_seed(0)
    result = test_fine_tuning(KillableLM(kill_at), SimpleNamespace(vocab_size=50, pad_token_id=0),
                              random_lines(60, seed=1), random_lines(8, seed=2), output_dir=str(out_dir / "run"),
                              resume_from_checkpoint=mode == "resume", **SETTINGS)
    frames = {key: result[key].drop(columns=[c for c in TIMING if c in result[key]]).to_dict("list")
              for key in ("steps_summary", "metrics_summary")}
    (out_dir / f"{mode}.json").write_text(json.dumps(dict(frames, loss_history=result["loss_history"],
                                                          resumed_from_step=result["resumed_from_step"])))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3]))
