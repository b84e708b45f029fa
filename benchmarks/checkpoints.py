"""What a checkpoint costs training: the stall per checkpoint against one synchronous torch.save of the same state.

    python benchmarks/checkpoints.py [--sizes 17M 124M] [--repeats 3] [--steps 40] [--every 5] [--dir DIR] [--root DIR]

Models: GPT-2 built from a ``GPT2Config`` (no download), 17M parameters (5 layers of 256) and GPT-2 small (124M).
Data: random token lines of ``--seq`` tokens (32; no padding), batch ``--batch`` (4), ``--steps`` optimizer steps
(``max_steps``), one epoch; AdamW's moments make a checkpoint 12 bytes a parameter. Each measurement is a fresh
process, the kinds alternate within a repeat:
  none    no checkpoint
  async   checkpoint_every=--every (plus the epoch-end one): the background writer (the default)
  sync    the same with async_checkpoints=False: training waits for every write (the previous behaviour)
  save    one torch.save of the model's and AdamW's state_dicts into one file on the same disk, then fsync
Stall per checkpoint = (run time with checkpoints - run time without) / checkpoints written, run time being the
whole ``test_fine_tuning`` call (its end waits for the last write). Also shown: what the training thread itself
spent per checkpoint inside ``RunCheckpoints.save`` (and how much of it waiting for the previous write: a
writer that has not finished when the next checkpoint comes is backlogged, space the checkpoints further apart)
and waiting, before the next update, for the writer's copy of the weights, and the run's final wait, which comes
once a run however many checkpoints it writes (the rest of the stall is the writer slowing the steps down, e.g.
sharing the CPU cores). Fresh processes on this 2-core VM differ by up to ~20% in speed, which at a few
checkpoints a run is more than the stall itself; so the stall is also measured inside each run: the training
thread's time in ``save``, the extra time of the optimizer steps that ran beside a background write against
the same run's other steps, and the final wait. ``--root DIR`` imports the package from DIR (a checkout before a
change; ``sync`` there runs its default). Medians over repeats. State the machine's load with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"17M": dict(n_embd=256, n_layer=5, n_head=4), "124M": {}}  # {}: GPT2Config's defaults = GPT-2 small
KINDS = ("none", "async", "sync", "save")


def _model(size: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(**SIZES[size], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def worker(kind: str, size: str, steps: int, every: int, folder: Path, batch: int = 4, seq: int = 32) -> dict:
    import torch

    model = _model(size)
    parameters = sum(p.numel() for p in model.parameters())
    if kind == "save":
        optimizer = torch.optim.AdamW(model.parameters())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()  # the moments exist: the state a checkpoint carries
        state, times = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, []
        for i in range(3):
            started = time.perf_counter()
            with open(folder / f"save-{i}.pt", "wb") as handle:
                torch.save(state, handle)
                handle.flush()
                os.fsync(handle.fileno())
            times.append(time.perf_counter() - started)
            (folder / f"save-{i}.pt").unlink()
        return {"parameters": parameters, "save_s": statistics.median(times)}

    from utils.tier3_training_utilities import test_fine_tuning
    from utils.training import trainer as trainer_module
    from utils.training.settings import FineTuneSettings

    spent = {"in_save_checkpoint": 0.0, "final_wait": 0.0, "update_waits": 0.0, "writer_waits": 0.0}
    calls = {"in_save_checkpoint": 0, "final_wait": 0, "update_waits": 0, "writer_waits": 0}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started
                calls[name] += 1
        return wrapper

    try:  # the checkpoint hand-off's own class (after the Trainer split); a --root before it: the Trainer's methods
        from utils.training.checkpoints import RunCheckpoints

        hand_off, save, finish = RunCheckpoints, "save", "finish"
    except ImportError:
        hand_off, save, finish = trainer_module.Trainer, "save_checkpoint", "finish_checkpoints"
    setattr(hand_off, save, timed("in_save_checkpoint", getattr(hand_off, save)))
    if hasattr(hand_off, finish):
        from utils.training.checkpoints import CheckpointWriter

        setattr(hand_off, finish, timed("final_wait", getattr(hand_off, finish)))
        CheckpointWriter.before_update = timed("update_waits", CheckpointWriter.before_update)
        CheckpointWriter.wait = timed("writer_waits", CheckpointWriter.wait)  # at each checkpoint and the end
    # Every optimizer step timed, and whether a background write ran during it: the steps a write slowed down,
    # against the same run's other steps (so the process's own speed, which varied up to ~20% between fresh processes
    # on this VM, cancels out). On CPU the step's work is done when the call returns.
    step_seconds, step_writing = [], []
    optimizer_step = trainer_module.Trainer.optimizer_step

    def timed_step(self, batches):
        writer = self.checkpoints.writer
        busy = lambda: writer is not None and writer.thread is not None and writer.thread.is_alive()  # noqa: E731
        writing, started = busy(), time.perf_counter()
        try:
            return optimizer_step(self, batches)
        finally:
            step_seconds.append(time.perf_counter() - started)
            step_writing.append(writing or busy())

    if hand_off is not trainer_module.Trainer:
        trainer_module.Trainer.optimizer_step = timed_step
    g = torch.Generator().manual_seed(1)
    lines = lambda n: [torch.randint(0, 50000, (seq,), generator=g) for _ in range(n)]  # noqa: E731
    options = dict(n_epochs=1, max_steps=steps, batch_size=batch, progress=False, save_plots=False,
                   output_dir=str(folder / "run"), learning_rate=1e-4)
    if kind != "none":
        options.update(checkpoint_every=every, keep_checkpoints=2)
    if kind == "sync" and "async_checkpoints" in FineTuneSettings.keyword_names():
        options["async_checkpoints"] = False
    train, val = lines(batch * steps), lines(8)
    started = time.perf_counter()
    result = test_fine_tuning(model, model.config, train, val, **options)
    seconds = time.perf_counter() - started
    written = calls["in_save_checkpoint"]  # every --every steps but the epoch's last, and the epoch's end
    quiet = [t for t, writing in zip(step_seconds[2:], step_writing[2:]) if not writing]  # the first two: warm-up
    # The mean, not the median: step times are skewed (a few slow ones), and any set of steps exceeds the median.
    quiet_step = statistics.fmean(quiet) if quiet else float("nan")
    slowed = sum(t - quiet_step for t, writing in zip(step_seconds, step_writing) if writing)
    return {"parameters": parameters, "run_s": seconds, "checkpoints": written, "global_step": result["global_step"],
            "quiet_step_s": quiet_step, "steps_beside_a_write": sum(step_writing), "slowed_steps_s": slowed, **spent}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32, help="tokens a line")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the workers")
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary folder)")
    parser.add_argument("--root", default=str(ROOT), help="import the package from this checkout")
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, args.root)
        print(json.dumps(worker(*args.worker, args.steps, args.every, Path(args.dir), args.batch, args.seq)))
        return
    print(f"load average at the start: {os.getloadavg()}", flush=True)
    for size in args.sizes:
        runs = {kind: [] for kind in args.kinds}
        for repeat in range(args.repeats):
            for kind in args.kinds:
                with tempfile.TemporaryDirectory(dir=args.dir) as folder:
                    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
                    done = subprocess.run([sys.executable, __file__, "--worker", kind, size, "--steps", str(args.steps),
                                           "--every", str(args.every), "--dir", folder, "--root", args.root,
                                           "--batch", str(args.batch), "--seq", str(args.seq)],
                                          capture_output=True, text=True, env=env)
                if done.returncode:
                    raise RuntimeError(f"{kind} {size} failed:\n{done.stderr[-3000:]}")
                runs[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(size, kind, repeat, runs[kind][-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
        median = lambda kind, key: statistics.median(r[key] for r in runs[kind])  # noqa: E731
        save = median("save", "save_s") if "save" in runs else None
        print(f"\n{size} ({runs[args.kinds[0]][0]['parameters'] / 1e6:.1f}M parameters), {args.steps} steps of "
              f"{args.batch}x{args.seq} tokens, a checkpoint every {args.every}, OMP_NUM_THREADS={args.threads}; "
              f"medians of {args.repeats}")
        if save is not None:
            print(f"  one synchronous torch.save + fsync: {save:.3f} s")
        for kind in ("async", "sync"):
            if kind in runs and "none" in runs:
                count = runs[kind][0]["checkpoints"]
                stall = (median(kind, "run_s") - median("none", "run_s")) / count
                ratio = f" = {stall / save:.2f}x one torch.save" if save else ""
                final = median(kind, "final_wait")
                backlog = statistics.median(r["writer_waits"] - r["final_wait"] for r in runs[kind]) / count
                print(f"  {kind}: stall per checkpoint {stall:.3f} s{ratio} (runs {median(kind, 'run_s'):.2f} s vs "
                      f"{median('none', 'run_s'):.2f} s without, {count} checkpoints; inside save_checkpoint "
                      f"{median(kind, 'in_save_checkpoint') / count:.3f} s each, of which waiting for the previous "
                      f"write {backlog:.3f} s; the updates waited for the copy "
                      f"{median(kind, 'update_waits') / count:.3f} s each, final wait {final:.3f} s)")
                rest = stall - final / count
                print(f"    without the run's final wait: {rest:.3f} s per checkpoint"
                      + (f" = {rest / save:.2f}x" if save else "") + f"; the final wait spread over the "
                      f"{count} checkpoints: {final / count:.3f} s each")
                if "slowed_steps_s" in runs[kind][0]:
                    # The same stall from inside each run: the training thread's time in save, the extra time of
                    # the steps that ran beside a write (against that run's other steps), and the final wait.
                    inside = [(r["in_save_checkpoint"] + r["slowed_steps_s"] + r["final_wait"]) / r["checkpoints"]
                              for r in runs[kind]]
                    slowed = median(kind, "slowed_steps_s") / count
                    print(f"    measured inside the runs: {statistics.median(inside):.3f} s per checkpoint"
                          + (f" = {statistics.median(inside) / save:.2f}x" if save else "")
                          + f" (runs: {', '.join(f'{x:.3f}' for x in inside)}); of it the steps beside a write "
                          f"({median(kind, 'steps_beside_a_write'):.0f} of {args.steps}) were slower by "
                          f"{slowed:.3f} s per checkpoint than the run's other steps "
                          f"(their mean {median(kind, 'quiet_step_s'):.3f} s a step)")


if __name__ == "__main__":
    main()
