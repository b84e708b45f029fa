"""FineTuneSettings is the one home of defaults and checks: every bad value raises before any forward pass."""
import inspect
import math
from types import SimpleNamespace

import pytest

from models import TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.settings import FineTuneSettings

DATA = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]

BAD = {
    "n_epochs": [0, -1, 1.5, "3", True],
    "batch_size": [0, 2.0, "4", None],
    "gradient_accumulation_steps": [0, "2"],
    "learning_rate": [-1e-3, math.nan, math.inf, "1e-3", None],
    "weight_decay": [-0.1, math.nan, "0.01"],
    "max_grad_norm": [0.0, -1.0, math.nan, math.inf, "1.0"],
    "warmup_ratio": [-0.1, 1.0, math.nan],
    "warmup_steps": [-1, 2.5],
    "val_fraction": [0.0, 1.0],
    "random_seed": [1.5, "42", -1, None],
    "shuffle": [1, "yes", None],
    "deterministic": ["no"],
    "use_lr_schedule": [0],
    "lr_schedule": ["exponential", None],
    "mixed_precision": ["fp8", True],
    "group_by_length": ["sometimes", 1],
    "pad_to_multiple_of": [0, "64", 8.0],
    "checkpoint_every": [0, -5, 1.5],
    "keep_checkpoints": [0, -1],
    "checkpoint_every_minutes": [0, -1.0, math.nan, math.inf, "30", True],
    "checkpoint_staging_dir": [5, "outputs/fine_tuning", "outputs/fine_tuning/checkpoints", "outputs"],
    "async_checkpoints": ["yes", 1],
    "early_stopping_patience": [0, -1],
    "eval_every": [0],
    "log_every": [0],
    "log_grad_dist_every": [0],
    "progress": ["some"],
}


class CountingLM(TinyCausalLM):
    def __init__(self):
        super().__init__(vocab_size=50)
        self.forwards = 0

    def forward(self, idx):
        self.forwards += 1
        return super().forward(idx)


@pytest.mark.parametrize("name,value", [(name, value) for name, values in BAD.items() for value in values])
def test_every_bad_setting_raises_before_any_forward(name, value):
    model = CountingLM()
    with pytest.raises((ValueError, TypeError), match=name):
        test_fine_tuning(model, SimpleNamespace(vocab_size=50, pad_token_id=0), DATA, DATA, progress=False,
                         save_plots=False, **{name: value})
    assert model.forwards == 0


def test_output_dir_that_is_a_file_is_named(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        test_fine_tuning(CountingLM(), SimpleNamespace(vocab_size=50, pad_token_id=0), DATA, DATA, output_dir=str(path))


def test_signature_defaults_are_the_settings_defaults():
    signature = inspect.signature(test_fine_tuning).parameters
    for name, parameter in signature.items():
        if name in FineTuneSettings.keyword_names():
            assert parameter.default == FineTuneSettings.default(name), name
    assert signature["gradient_clip_norm"].default == FineTuneSettings.default("max_grad_norm")


def test_good_defaults_validate():
    FineTuneSettings().validate()
