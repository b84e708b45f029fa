"""The data seam (issue 34): every source implements one contract; every row a stream or a loader reads is recorded
and compared when a resume replays it; a DataLoader's own generator is restored at an epoch boundary too; a
stream's bad rows are named (row and step) or gone past with ``bad_examples``. Resumes follow a SIGKILL in a
subprocess (tests/seam_worker.py). TIER3_LOADER_KILLS adds random kills to the loader run (default 1)."""
import ast
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import seam_worker
from models import StopAtForward, TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.data import PlanSettings
from utils.training.data import BatchSource
from utils.training.data import ExampleBatches, LoaderBatches, StreamBatches, batch_source

VOCAB, PAD = seam_worker.VOCAB, seam_worker.PAD
PACKAGE = Path(__file__).resolve().parent.parent / "utils" / "training"
STREAM_FORMS = ["datasets", "iterable", "iterable-loader"]


def _worker(form, out_dir, **arguments):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, str(Path(seam_worker.__file__)), form, str(out_dir), json.dumps(arguments)]
    return subprocess.Popen(command, cwd=out_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finished(process, code=0):
    assert process.wait(timeout=300) == code, process.stderr.read()[-3000:]


def _changed(rows, index):
    rows = [list(r) for r in rows]
    rows[index] = [(t % (VOCAB - 2)) + 2 for t in rows[index]]  # same length, other tokens
    return rows


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Each stream form and a validation stream, SIGKILLed at training forward 7 (checkpoints every 2 steps: the
    newest is step 6), and uninterrupted runs of the iterable loader and the shuffling loader to compare with; the
    processes run together."""
    forms = STREAM_FORMS + ["val-stream", "whole-iterable-loader", "whole-loader"]
    folders = {form: tmp_path_factory.mktemp(form) for form in forms}
    processes = {form: _worker(form.replace("whole-", ""), folder, kill_at=None if "whole" in form else 7)
                 for form, folder in folders.items()}
    for form, process in processes.items():
        _finished(process, 0 if "whole" in form else -signal.SIGKILL)
    return folders


def _resume(form, folder, train=None, val=None, **overrides):
    torch.manual_seed(1)  # other initial weights: the checkpoint replaces them
    common = dict(progress=False, save_plots=False, output_dir=str(folder / "run"), resume_from_checkpoint=True)
    if form == "val-stream":
        data = (seam_worker.train_rows(), seam_worker.Reiterable(val or seam_worker.val_rows()))
        settings = dict(seam_worker.STREAM, eval_every=2)
    elif form == "loader":
        data = (seam_worker.shuffling_loader(train), seam_worker.lines(12, seed=9))
        settings = seam_worker.LOADER
    else:
        data = (seam_worker.stream(form, train or seam_worker.train_rows()), seam_worker.lines(12, seed=9))
        settings = seam_worker.STREAM
    model = StopAtForward(TinyCausalLM(vocab_size=VOCAB, dropout=0.1))  # the killed run's architecture
    return test_fine_tuning(model, seam_worker.CONFIG, *data,
                            **dict(settings, **common, **{k: v for k, v in overrides.items() if k not in common}))


@pytest.mark.parametrize("form", STREAM_FORMS)
@pytest.mark.parametrize("row", [20, 47])
def test_a_changed_stream_row_is_named_when_a_killed_run_resumes(killed, form, row):
    # All 60 rows are read into the first buffer before step 1, so both rows were read before the checkpoint.
    with pytest.raises(ValueError, match=rf"Cannot resume: row {row} of epoch 1 of the training data differs"):
        _resume(form, killed[form], train=_changed(seam_worker.train_rows(), row))


def test_a_changed_validation_stream_row_is_named_when_a_killed_run_resumes(killed):
    with pytest.raises(ValueError, match=r"Cannot resume: row 30 of a validation pass of the validation data differs"):
        _resume("val-stream", killed["val-stream"], val=_changed(seam_worker.val_rows(), 30))


def test_an_iterable_loader_killed_mid_epoch_resumes_to_the_uninterrupted_run(killed):
    _finished(_worker("iterable-loader", killed["iterable-loader"], mode="resume", resume_from_checkpoint=True))
    whole = json.loads((killed["whole-iterable-loader"] / "run.json").read_text())  # in the same kind of process
    resumed = json.loads((killed["iterable-loader"] / "resume.json").read_text())
    assert resumed["resumed_from_step"] == 6 and resumed["global_step"] == whole["global_step"] == 10
    assert resumed["loss_history"] == whole["loss_history"] and resumed["final_val_loss"] == whole["final_val_loss"]


def test_a_loaders_own_generator_is_restored_at_an_epoch_boundary_and_through_sigkills(killed, tmp_path):
    """A shuffling DataLoader with generator=, killed at the first forward of epoch 2 (the newest checkpoint ends
    epoch 1, 9 steps): the resume draws epoch 2's order from the restored generator. It is killed again at random
    forwards (checkpoints every 2 steps and at each epoch's end), then resumed to the end: the uninterrupted run's
    weights and validation loss, exactly."""
    _finished(_worker("loader", tmp_path, kill_at=10), -signal.SIGKILL)
    rng, kills = random.Random(int(os.environ.get("TIER3_KILL_SEED", "0"))), 1
    for _ in range(int(os.environ.get("TIER3_LOADER_KILLS", "1"))):
        process = _worker("loader", tmp_path, kill_at=rng.randint(2, 8))
        assert process.wait(timeout=300) in (0, -signal.SIGKILL), process.stderr.read()[-3000:]
        kills += process.returncode == -signal.SIGKILL
    _finished(_worker("loader", tmp_path, mode="resume"))
    reference, resumed = (json.loads(path.read_text()) for path in (killed["whole-loader"] / "run.json",
                                                                     tmp_path / "resume.json"))
    assert kills >= 2 and resumed["global_step"] == reference["global_step"] == 27
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    assert resumed["loss_history"][-9:] == reference["loss_history"][-9:]  # epoch 3, after every kill
    whole, weights = torch.load(killed["whole-loader"] / "run-weights.pt"), torch.load(tmp_path / "resume-weights.pt")
    for key, value in whole.items():
        assert torch.equal(weights[key], value), key


# -- resumes at an epoch boundary ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def epoch_end(tmp_path_factory):
    """Runs killed at the first forward of epoch 2 and resumed from epoch 1's end (``seam_worker.epoch_end_runs``:
    22 steps over the 60-row stream, whose first epoch is 18 steps; the shuffling loader, 9 steps an epoch)."""
    root = tmp_path_factory.mktemp("epoch-end")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(Path(seam_worker.__file__)), "epoch-end", str(root),
                           json.dumps(STREAM_FORMS)], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((root / "report.json").read_text())
    for run, code in report.items():
        assert code == (-signal.SIGKILL if run.endswith("cut") else 0), (run, code, done.stderr[-3000:])
    return root


@pytest.mark.parametrize("form", STREAM_FORMS)
def test_a_stream_resumed_at_an_epoch_boundary_gives_the_uninterrupted_run(epoch_end, form):
    """The replay of the finished epoch reads the stream once more and draws nothing: epoch 2 is the uninterrupted
    run's, bit for bit (the runs are forked children of one worker process)."""
    folder = epoch_end / form
    whole = json.loads((folder / "whole" / "whole.json").read_text())
    resumed = json.loads((folder / "resumed" / "resume.json").read_text())
    ends, steps = whole["epoch_ends"], seam_worker.EPOCH_END["max_steps"]
    assert ends[0] < steps and resumed["resumed_from_step"] == ends[0]  # resumed at epoch 1's end
    assert resumed["global_step"] == whole["global_step"] == steps
    assert resumed["loss_history"] == whole["loss_history"] and resumed["final_val_loss"] == whole["final_val_loss"]
    weights = torch.load(folder / "resumed" / "resume-weights.pt")
    for key, value in torch.load(folder / "whole" / "whole-weights.pt").items():
        assert torch.equal(weights[key], value), key


DIFFERS = "of epoch 1 of the training data differs from the one read"
FINISHED_EPOCH_CHANGES = {  # a change to rows epoch 1 trained -> the refusal that names it
    "row 20 changed": (lambda rows: _changed(rows, 20), f"row 20 {DIFFERS}"),
    "row 47 changed": (lambda rows: _changed(rows, 47), f"row 47 {DIFFERS}"),
    "a row appended": (lambda rows: rows + [rows[3]], "row 60 of epoch 1 of the training data was not there"),
    "the last row gone": (lambda rows: rows[:-1], "the training data ended after 59 rows of epoch 1, but 60 were read"),
}


@pytest.mark.parametrize("form", STREAM_FORMS)
@pytest.mark.parametrize("change", FINISHED_EPOCH_CHANGES)
def test_a_stream_changed_in_its_finished_epoch_is_refused_when_resumed_at_its_end(epoch_end, form, change):
    edit, message = FINISHED_EPOCH_CHANGES[change]
    with pytest.raises(ValueError, match=rf"Cannot resume: {message}.*resume_from_checkpoint=False"):
        _resume(form, epoch_end / form / "cut", train=edit(seam_worker.train_rows()), **seam_worker.EPOCH_END)


def test_a_loader_over_a_changed_dataset_is_refused_when_resumed_at_an_epoch_end(epoch_end):
    """Row 12 of the dataset is not in the loader's fingerprinted first batch: only the replay of epoch 1 sees it."""
    with pytest.raises(ValueError, match=r"Cannot resume: row \d+ of epoch 1 of the training data \(in batch \d+ of "
                                         r"this epoch as its row \d+\) differs") as error:
        _resume("loader", epoch_end / "loader", train=_changed(seam_worker.loader_rows(), 12))
    row, batch, in_batch = map(int, re.search(r"row (\d+) .* batch (\d+) .* row (\d+)\)", str(error.value)).groups())
    assert row == 4 * (batch - 1) + in_batch  # its index in the epoch's reading: batches of 4 rows


def test_replaying_a_finished_epoch_moves_no_random_state():
    """A shuffling loader without generator= draws its order from torch's RNG (its sampler draws once more when the
    pass ends): the replay of epoch 1 at a resume from its end leaves torch's RNG where the checkpoint put it, so
    epoch 2 is drawn as in the uninterrupted run."""
    def loader():
        rows = [{"input_ids": torch.tensor(r)} for r in seam_worker.loader_rows()]
        return torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True, collate_fn=seam_worker.pad_rows)

    spec = PlanSettings(4)
    torch.manual_seed(3)
    whole = LoaderBatches(loader(), PAD)
    list(whole.steps(spec, 0, 0))
    torch.rand(7)  # training's draws (dropout) after the epoch drew its order
    state, rng = whole.state_dict(), torch.get_rng_state()
    epoch_2 = [batches[0]["input_ids"].tolist() for _, batches in whole.steps(spec, 1, 0)]
    resumed = LoaderBatches(loader(), PAD)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)  # as the resume sets it, after the sources took their state back
    steps = resumed.steps(spec, 1, 0)  # epoch 1 is read again here, before epoch 2 draws its order
    assert [batches[0]["input_ids"].tolist() for _, batches in steps] == epoch_2


# -- checks of a stream's rows ---------------------------------------------------------------------------------
LIMITED = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD, n_positions=40)


def _deep_bad_stream(bad_row):
    rows = seam_worker.lines(300, seed=2)
    rows[250] = bad_row
    return seam_worker.Reiterable(rows)


def _fit_stream(stream, tmp_path, **keywords):
    torch.manual_seed(0)
    return test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), LIMITED, stream, seam_worker.lines(8, seed=9), max_steps=70,
                            batch_size=4, stream_buffer_size=64, progress=False, save_plots=False,
                            output_dir=str(tmp_path), **keywords)


@pytest.mark.parametrize("bad, kind", [([5] * 60, "too_long"), ([5, 60, 7], "ids_outside_vocabulary")])
def test_a_bad_row_deep_in_a_stream_is_named_with_its_step_or_gone_past(tmp_path, bad, kind):
    words = "has 60 tokens, more than the model's 40" if kind == "too_long" else "holds token id 60"
    with pytest.raises(ValueError, match=rf"Row 250 of the training data \(a stream; read in epoch 1 after its "
                                         rf"optimizer step \d+\) {words}.*bad_examples='skip'"):
        _fit_stream(_deep_bad_stream(bad), tmp_path / "error")
    skipped = _fit_stream(_deep_bad_stream(bad), tmp_path / "skip", bad_examples="skip")
    assert skipped["global_step"] == 70 and skipped["bad_examples"]["training data"][kind] == 1
    truncated = _fit_stream(_deep_bad_stream(bad), tmp_path / "truncate", bad_examples="truncate")
    counted = "truncated" if kind == "too_long" else kind
    assert truncated["global_step"] == 70 and truncated["bad_examples"]["training data"][counted] == 1


def test_a_list_collating_iterable_loader_gets_the_map_style_message(tmp_path):
    rows = [{"input_ids": torch.tensor(r)} for r in seam_worker.lines(12)]
    messages = []
    for loader in (torch.utils.data.DataLoader(seam_worker.Rows([r["input_ids"].tolist() for r in rows]), batch_size=2,
                                               collate_fn=list),
                   torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=list)):
        with pytest.raises(TypeError, match=r"yields list batches; it must yield dicts with 'input_ids'") as error:
            _fit_stream(loader, tmp_path)
        messages.append(str(error.value))
    assert messages[0] == messages[1]


def test_the_probe_batch_holds_padding_when_the_data_has_one_length():
    rows = [torch.arange(1, 9) for _ in range(8)]  # every example 8 tokens: no batch of them is padded
    loader = torch.utils.data.DataLoader([{"input_ids": r} for r in rows], batch_size=4)
    for source in (LoaderBatches(loader, PAD), batch_source(rows, PAD)):
        probe = source.padded_batch()
        assert not bool(probe["attention_mask"].all()), type(source).__name__
        assert (probe["labels"] != -100).sum() > 0


# -- the layout ------------------------------------------------------------------------------------------------
def test_every_source_implements_the_contract_and_nothing_else_asks_the_kind():
    for source in (ExampleBatches, LoaderBatches, StreamBatches):
        assert issubclass(source, BatchSource) and not source.__abstractmethods__
    for module in ("trainer.py", "engine.py", "evaluation.py", "model/checks.py"):
        text = (PACKAGE / module).read_text()
        assert not re.search(r"\.plannable|\.streamed|\"first_step\"|Batches\b|is_stream", text), module


def test_no_source_class_is_over_250_lines():
    modules = ("data/streaming.py", "data/loaders.py", "data/tables.py", "data/source_contract.py")
    sizes = {node.name: node.end_lineno - node.lineno + 1 for module in modules
             for node in ast.parse((PACKAGE / module).read_text()).body if isinstance(node, ast.ClassDef)}
    assert {"StreamBatches", "LoaderBatches", "ExampleBatches"} <= set(sizes)
    assert max(sizes.values()) <= 250, sizes


def test_no_module_imports_another_modules_private_names():
    for path in sorted(PACKAGE.parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_reading_splitting_and_subsetting_rows_each_live_in_one_module():
    """Issue 44: a row -> Example is rows.py's job; which rows a part holds (the val_fraction hold-out, each
    process's shard, rows gone past) is subsets.py's. Each is defined there once, and the sources call it there:
    no other module of the data seam parses a row, draws a hold-out or shards a stream itself."""
    texts = {path.name: path.read_text() for path in sorted((PACKAGE / "data").glob("*.py"))}
    homes = {"rows.py": ("read_example", "to_example", "cut_to_real_span", "batch_rows", "batch_with_pad_rule"),
             "subsets.py": ("split_positions", "shard_batches", "stream_shard", "keep_with_real_targets", "RowChecks")}
    for home, names in homes.items():
        for name in names:
            defined = [module for module, text in texts.items() if re.search(rf"^(def|class) {name}\b", text, re.M)]
            assert defined == [home], (name, defined)
    for source in ("tables.py", "streaming.py", "loaders.py"):
        assert re.search(r"from \.rows import [^)]*read_example", texts[source]), source
    for source, calls in (("tables.py", ("split_positions(", "shard_batches(", "keep_with_real_targets(")),
                          ("streaming.py", ("stream_shard(", "RowChecks("))):
        assert all(call in texts[source] for call in calls), source
    for module, text in texts.items():
        if module != "subsets.py":
            assert not re.search(r"split_dataset_by_node|islice\([^)]*rank", text), module
        if module != "rows.py":
            assert not re.search(r"_as_long_1d|real_token_mask\(", text), module
