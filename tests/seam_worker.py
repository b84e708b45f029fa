"""Run by tests/test_data_seam.py: one run over a stream or a DataLoader, SIGKILLed at a chosen training forward
(``kill_at``) or run to its end; the test then resumes it in its own process.

``python seam_worker.py FORM OUT_DIR '{"kill_at": 7, ...}'`` writes OUT_DIR/<mode>.json and -weights.pt when it ends;
``python seam_worker.py epoch-end ROOT '["datasets", ...]'`` runs :func:`epoch_end_runs`.
"""
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import StopAtForward, TinyCausalLM  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
STREAM = dict(max_steps=10, checkpoint_every=2, keep_checkpoints=2, batch_size=4, learning_rate=3e-3)
LOADER = dict(n_epochs=3, batch_size=4, shuffle=True, learning_rate=3e-3, resume_from_checkpoint=True,
              checkpoint_every=2)


def lines(n, seed=0, low=2, high=30):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


class Reiterable:
    """Any iterable of examples without a length (not a datasets object): iterating starts over."""

    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)


class Rows(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        return iter({"input_ids": torch.tensor(r)} for r in self.rows)


def pad_rows(batch):
    """A user's collate_fn: right-padded dict batches with a mask."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.stack([torch.nn.functional.pad(b["input_ids"], (0, width - len(b["input_ids"]))) for b in batch])
    lengths = torch.tensor([[len(b["input_ids"])] for b in batch])
    return {"input_ids": ids, "attention_mask": (torch.arange(width) < lengths).long()}


def stream(form, rows):
    """``rows`` in one of the stream forms the package takes."""
    if form == "datasets":
        import datasets

        return datasets.Dataset.from_dict({"input_ids": rows}).to_iterable_dataset(num_shards=2)
    if form == "iterable":
        return Reiterable(rows)
    return torch.utils.data.DataLoader(Rows(rows), batch_size=3, collate_fn=pad_rows)


def train_rows():
    return lines(60, seed=4)


def val_rows():
    return lines(40, seed=9)


def loader_rows():
    return lines(36, seed=5, low=3)


def shuffling_loader(rows=None):
    """A map-style DataLoader with its own generator: its order depends on the generator's state."""
    data = [{"input_ids": torch.tensor(r)} for r in rows or loader_rows()]
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=pad_rows,
                                       generator=torch.Generator().manual_seed(7))


def run(form, out_dir, kill_at=None, mode="run", **overrides):
    torch.manual_seed(0)
    model = StopAtForward(TinyCausalLM(vocab_size=VOCAB, dropout=0.1), kill_at, kill=True)
    common = dict(progress=False, save_plots=False, output_dir=str(Path(out_dir) / "run"))
    if form == "loader":
        train, val, settings = shuffling_loader(), lines(12, seed=9), dict(LOADER, **common)
    elif form == "val-stream":
        train, val, settings = train_rows(), Reiterable(val_rows()), dict(STREAM, eval_every=2, **common)
    else:
        train, val, settings = stream(form, train_rows()), lines(12, seed=9), dict(STREAM, **common)
    result = test_fine_tuning(model, CONFIG, train, val, **dict(settings, **overrides))
    torch.save(model.state_dict(), Path(out_dir) / f"{mode}-weights.pt")
    summary = {k: result[k] for k in ("loss_history", "final_val_loss", "global_step", "resumed_from_step")}
    summary["epoch_ends"] = [int(step) for step in result["metrics_summary"]["global_step"]]  # an epoch's last step
    (Path(out_dir) / f"{mode}.json").write_text(json.dumps(summary))
    return result


EPOCH_END = dict(max_steps=22, checkpoint_every=None, resume_from_checkpoint=True)  # checkpoints at epoch ends only


def in_child(function, *args, **keywords) -> int:
    """``function(*args, **keywords)`` in a forked child of this process; how it ended (exit code, or -signal)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into the caller's code
        code = 0
        try:
            function(*args, **keywords)
        except BaseException:  # noqa: BLE001 - reported through the exit code and stderr
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def epoch_end_runs(root: Path, forms: list) -> None:
    """Per stream form: the run uninterrupted (``whole``), SIGKILLed at the first forward of epoch 2 (``cut``: its
    newest checkpoint is epoch 1's end) and a copy of that resumed (``resumed``); the shuffling loader (9 steps an
    epoch) SIGKILLed at forward 10. Each run is a forked child of this process: torch is imported once, every run
    starts from the same state and runs the same kernels. Writes ROOT/report.json (how each run ended)."""
    torch.set_num_threads(1)  # with OMP_NUM_THREADS=1: no thread pool exists when the runs are forked
    import datasets  # noqa: F401 - imported once here, not in every forked run

    report = {}
    for form in forms:
        folder = {run: root / form / run for run in ("whole", "cut", "resumed")}
        for path in folder.values():
            path.mkdir(parents=True)
        report[f"{form} whole"] = in_child(run, form, folder["whole"], None, "whole", **EPOCH_END)
        epoch_end = json.loads((folder["whole"] / "whole.json").read_text())["epoch_ends"][0]
        report[f"{form} cut"] = in_child(run, form, folder["cut"], epoch_end + 1, "cut", **EPOCH_END)
        shutil.rmtree(folder["resumed"])
        shutil.copytree(folder["cut"], folder["resumed"])  # "cut" keeps its checkpoint at epoch 1's end
        report[f"{form} resumed"] = in_child(run, form, folder["resumed"], None, "resume", **EPOCH_END)
    (root / "loader").mkdir()
    report["loader cut"] = in_child(run, "loader", root / "loader", 10, "cut")
    (root / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "epoch-end":
        epoch_end_runs(Path(sys.argv[2]), json.loads(sys.argv[3]))
    else:
        run(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
