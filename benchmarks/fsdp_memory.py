"""Per-process memory of parameters, gradients and AdamW state, and step time: DDP vs fsdp=True (2 processes).

    python benchmarks/fsdp_memory.py [--processes 2] [--d-model 256] [--layers 6] [--vocab 16000] [--steps 8]

Each mode runs the package's trainer under torchrun (gloo on CPU, NCCL on CUDA) on the same model (a plain
causal transformer from tests/models.py: ~11.4M parameters with the defaults) and random lines of 64 tokens,
batch 4 per process. Bytes are counted from the tensors each process holds (a DTensor counts its local shard):
parameters and optimizer state after the run, gradients just before the last optimizer update. Step time: the
mean time between consecutive optimizer updates (no validation in between). Prints one JSON line per mode and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += tensor.numel() * tensor.element_size()
    return total


def worker(mode: str, arguments) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from models import TinyCausalLM
    from utils.training.engine import RunHooks, build_trainer
    from utils.training.settings import FineTuneSettings

    torch.manual_seed(0)
    model = TinyCausalLM(vocab_size=arguments.vocab, d_model=arguments.d_model, n_heads=4, n_layers=arguments.layers)
    n_parameters = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    world = int(os.environ["WORLD_SIZE"])
    lines = [torch.randint(1, arguments.vocab, (64,), generator=g) for _ in range(arguments.steps * 4 * world)]
    settings = FineTuneSettings.from_keywords(dict(
        n_epochs=1, batch_size=4, learning_rate=1e-3, shuffle=False, progress=False, save_plots=False,
        val_fraction=0.1, fsdp=mode == "fsdp", output_dir=tempfile.mkdtemp(prefix=f"fsdp-memory-{mode}-")))
    config = type("Config", (), {"vocab_size": arguments.vocab, "pad_token_id": 0})()
    trainer, _ = build_trainer(model, config, (lines, lines[:8]), settings, None, None, RunHooks())
    gradient_bytes, update_times = [], []
    apply_update = trainer.apply_update

    def measured_update():
        gradient_bytes.append(_local_bytes(p.grad for p in trainer.model.parameters()))
        apply_update()
        update_times.append(time.perf_counter())

    trainer.apply_update = measured_update
    trainer.fit()
    optimizer_bytes = _local_bytes(v for state in trainer.optimizer.state.values() for v in state.values()
                                   if isinstance(v, torch.Tensor) and v.dim() > 0)
    row = {"mode": mode, "processes": world, "n_parameters": n_parameters,
           "parameter_MB": _local_bytes(trainer.model.parameters()) / 2**20, "gradient_MB": gradient_bytes[-1] / 2**20,
           "optimizer_MB": optimizer_bytes / 2**20,
           # between consecutive updates: one whole step (forward, backward, update), no validation
           "step_s": (update_times[-1] - update_times[0]) / (len(update_times) - 1), "steps": trainer.state.global_step}
    row["total_MB"] = row["parameter_MB"] + row["gradient_MB"] + row["optimizer_MB"]
    if trainer.ctx.is_main:
        print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--port", type=int, default=29561)
    parser.add_argument("--worker", choices=("ddp", "fsdp"))
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments.worker, arguments)
        return
    rows = {}
    for mode in ("ddp", "fsdp"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={arguments.processes}",
                               f"--master_port={arguments.port}", __file__, "--worker", mode,
                               *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(arguments).items()
                                     if k in ("d_model", "layers", "vocab", "steps")), [])],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        found = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
        rows[mode] = json.loads(found[0])
        print(json.dumps(rows[mode]))
    print(f"fsdp / ddp per process: parameters+gradients+optimizer {rows['fsdp']['total_MB'] / rows['ddp']['total_MB']:.3f}, "
          f"parameters+optimizer {(rows['fsdp']['parameter_MB'] + rows['fsdp']['optimizer_MB']) / (rows['ddp']['parameter_MB'] + rows['ddp']['optimizer_MB']):.3f}, "
          f"step time {rows['fsdp']['step_s'] / rows['ddp']['step_s']:.2f}x")


if __name__ == "__main__":
    main()
