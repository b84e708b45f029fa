"""Run by tests/test_search.py in a separate process: a search sharing a storage, optionally killed mid-trial."""
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyCausalLM  # noqa: E402
from utils.tier3_training_utilities import test_hyperparameter_search  # noqa: E402

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0)


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


class KillingLM(TinyCausalLM):
    """SIGKILLs its own process at its 3rd training forward: a Colab disconnect in the middle of a trial."""

    def forward(self, idx):
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(idx)


def search(storage, n_trials, *, kill=False, heartbeat_interval=60, output_dir="outputs/search", pruning=True):
    factory = (lambda: KillingLM(vocab_size=VOCAB)) if kill else (lambda: TinyCausalLM(vocab_size=VOCAB))
    return test_hyperparameter_search(factory, CONFIG, data(), data(8, seed=1), n_trials=n_trials, storage=storage,
                                      study_name="shared", heartbeat_interval=heartbeat_interval,
                                      save_plots=False, progress=False, output_dir=output_dir, pruning=pruning)


if __name__ == "__main__":
    storage, n_trials, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    # Pruning off: every trial of the shared study runs to its end, whatever the other process reports.
    search(storage, n_trials, kill=mode == "kill", heartbeat_interval=1, output_dir=f"outputs/search-{os.getpid()}",
           pruning=False)
