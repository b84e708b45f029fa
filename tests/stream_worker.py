"""Run by tests/test_streaming.py under torchrun (2 processes): a streamed training source, a shard per process."""
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import TinyCausalLM  # noqa: E402
from utils.tier3_training_utilities import test_fine_tuning  # noqa: E402

VOCAB, PAD = 50, 0


def main(out_dir: str) -> None:
    rank = int(os.environ.get("RANK", 0))
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, VOCAB, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g).tolist()
            for _ in range(61)]
    import datasets

    from utils.training.data import batch_source
    from test_streaming import Reiterable

    tagged = [row + [k % (VOCAB - 1) + 1] for k, row in enumerate(rows)]  # distinct rows: the shards can be compared
    for form in ("datasets", "iterable"):
        if form == "datasets":
            stream = datasets.Dataset.from_dict({"input_ids": tagged}).to_iterable_dataset(num_shards=4)
        else:
            stream = Reiterable(tagged)
        torch.manual_seed(0)
        result = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD),
                                  stream, rows[:8], max_steps=30, batch_size=2, stream_buffer_size=16,
                                  learning_rate=1e-2, progress=False, save_plots=False,
                                  output_dir=f"{out_dir}/{form}-run")
        summary = {k: result[k] for k in ("global_step", "loss_history", "epochs_completed")}
        # The rows of this process's shard, as the training source reads them.
        summary["read"] = [tagged.index(list(row["input_ids"]) if isinstance(row, dict) else row)
                           for row in batch_source(stream, PAD)._shard(2, rank, 0)]
        Path(out_dir, f"{form}-rank{rank}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
