"""Run by tests/test_search.py in separate processes: searches sharing a storage, optionally killed mid-trial,
and new studies created by two processes at the same moment.

    python search_worker.py STORAGE N_TRIALS ok|kill [JSON keywords]   # writes worker-<pid>.json (its counts)
    python search_worker.py OUTPUT_DIR 0 reference [JSON keywords]     # test_fine_tuning alone: reference.json
JSON keywords may hold "architecture": true (search MODEL_SPACE with the factory ``architecture``) and, for a
reference run, "model_params" (the model the factory builds).
    python search_worker.py FOLDER ROUNDS race ME OTHER               # writes race-<ME>.json (one line per round)
"""
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import wait_for_checkpoint_writes, TinyCausalLM  # noqa: E402
from utils.tier3_training_utilities import test_hyperparameter_search  # noqa: E402

VOCAB = 50
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=0)
KILL_AT_FORWARD = 3


def data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(n)]


class KillingLM(TinyCausalLM):
    """SIGKILLs its own process at its ``kill_at``-th training forward: a Colab disconnect in the middle of a trial."""

    def __init__(self, kill_at, **kwargs):
        super().__init__(**kwargs)
        self.kill_at = kill_at

    def forward(self, idx):
        if self.training:
            self.calls = getattr(self, "calls", 0) + 1
            if self.calls == self.kill_at:
                wait_for_checkpoint_writes()  # the checkpoints taken before the kill are complete (as in models.py)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().forward(idx)


def new_model(kill_at=None):
    torch.manual_seed(0)  # every trial starts from the same weights, as test_fine_tuning(_model()) does in the tests
    return KillingLM(kill_at, vocab_size=VOCAB)  # one class in every mode: a study refuses another model


# The architecture search of issue 46: depth and width of the same tiny transformer.
MODEL_SPACE = {"n_layer": ("int", 1, 3), "n_embd": [32, 64]}


def architecture(params, kill_at=None):
    """The factory of the architecture search: the model its parameters describe, from the same seed."""
    torch.manual_seed(0)
    return KillingLM(kill_at, vocab_size=VOCAB, d_model=params["n_embd"], n_layers=params["n_layer"])


def search(storage, n_trials, *, kill_at=None, heartbeat_interval=60, output_dir="outputs/search", pruning=True,
           architecture_search=False, **keywords):
    if architecture_search:
        keywords["model_space"] = MODEL_SPACE
    factory = ((lambda params: architecture(params, kill_at)) if architecture_search
               else (lambda: new_model(kill_at)))
    return test_hyperparameter_search(factory, CONFIG, data(), data(8, seed=1), n_trials=n_trials,
                                      storage=storage, study_name="shared", heartbeat_interval=heartbeat_interval,
                                      save_plots=False, progress=False, output_dir=output_dir, pruning=pruning,
                                      **keywords)


def run_worker(cwd: Path, *args: str):
    """This file run in a fresh process (as a killed trial's retry must be, to compare bit for bit)."""
    import subprocess

    return subprocess.run([sys.executable, __file__, *args], cwd=cwd, timeout=300)


def kill_a_trial_then_retry(cwd: Path, keywords: dict, kill_at: int):
    """Trial 0 of study 'shared' SIGKILLed at its ``kill_at``-th training forward, then retried by a second search
    past the heartbeat's grace period: (the checkpoint steps the kill left, the failed trial, its retry)."""
    import optuna

    storage = f"sqlite:///{cwd / 'study.db'}"
    assert run_worker(cwd, storage, "1", "kill", json.dumps(dict(keywords, kill_at=kill_at))).returncode == -9
    checkpoints = cwd / "outputs" / "search" / "shared" / "trial-0" / "checkpoints"
    left = sorted(int(p.name[len("step-"):]) for p in checkpoints.glob("step-*"))
    assert left, "the killed trial wrote no checkpoint"
    time.sleep(3)  # past the grace period (2 x heartbeat_interval=1 s)
    assert run_worker(cwd, storage, "1", "ok", json.dumps(keywords)).returncode == 0
    first, retry = optuna.load_study(study_name="shared", storage=storage).trials
    return left, first, retry


def race(folder: Path, rounds: int, me: str, other: str) -> None:
    """Both processes create round r's new SQLite study within a millisecond of each other."""
    outcomes = []
    for round_ in range(rounds):
        (folder / f"ready-{round_}-{me}").touch()
        deadline = time.time() + 60
        while not (folder / f"ready-{round_}-{other}").exists() and time.time() < deadline:
            time.sleep(0.0005)
        try:
            search(f"sqlite:///{folder / f'round-{round_}.db'}", 0, heartbeat_interval=1)
            outcomes.append("ok")
        except Exception as error:  # noqa: BLE001 - the test reports every round's error
            outcomes.append(f"{type(error).__name__}: {error}"[:300])
    (folder / f"race-{me}.json").write_text(json.dumps(outcomes))


if __name__ == "__main__":
    if sys.argv[3] == "race":
        race(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[4], sys.argv[5])
        sys.exit(0)
    storage, n_trials, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    keywords = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    if "search_space" in keywords:  # JSON has no tuples; a list would mean "categorical"
        keywords["search_space"] = {name: tuple(spec) for name, spec in keywords["search_space"].items()}
    if mode == "kill":
        keywords.setdefault("kill_at", KILL_AT_FORWARD)
    keywords.setdefault("heartbeat_interval", 1)
    torch.set_num_threads(1)  # several workers share the test machine's cores; their heartbeats must keep beating
    if mode == "reference":  # the same training without a search, as a reference run in a process like the trials'
        from utils.tier3_training_utilities import test_fine_tuning

        keywords.pop("search_space", None), keywords.pop("heartbeat_interval"), keywords.pop("architecture", None)
        model_params = keywords.pop("model_params", None)
        # As the search trains it: the factory's model and a copy of CONFIG with the model parameters set.
        model = new_model() if model_params is None else architecture(model_params)
        config = SimpleNamespace(**vars(CONFIG), **(model_params or {}))
        result = test_fine_tuning(model, config, data(), data(8, seed=1), save_plots=False, progress=False,
                                  output_dir=storage, **keywords)
        Path("reference.json").write_text(json.dumps({k: result[k] for k in ("final_val_loss", "global_step")}))
        sys.exit(0)
    # Pruning off: every trial of the shared study runs to its end, whatever the other processes report.
    result = search(storage, n_trials, pruning=False, architecture_search=keywords.pop("architecture", False),
                    **keywords)
    Path(f"worker-{os.getpid()}.json").write_text(json.dumps({k: result[k] for k in ("n_trials", "n_trials_in_study")}))
