"""Warnings are said once, at the user's line, and above the progress bar (issue 26)."""
import io
import warnings
from types import SimpleNamespace

import pytest
import torch
from tqdm import tqdm

from models import TinyCausalLM
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.model import detect_pad_token_id
from utils.training.warn import warnings_through

DATA = [torch.randint(1, 50, (int(n),))
        for n in torch.randint(3, 12, (12,), generator=torch.Generator().manual_seed(0))]


def _run(config):
    torch.manual_seed(0)
    return test_fine_tuning(TinyCausalLM(vocab_size=50), config, DATA, DATA[:4], n_epochs=1, progress=False,
                            save_plots=False)


def test_pad_fallback_is_warned_and_printed_once_per_config_at_the_callers_line(capsys):
    config = SimpleNamespace(vocab_size=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # count every call, not Python's once-per-line
        _run(config)
        _run(config)  # a search calls the engine once per trial with the same config
    fallback = [w for w in caught if "defaulting to 0" in str(w.message)]
    assert len(fallback) == 1
    assert fallback[0].filename == __file__  # this file's line, not one inside utils/
    assert capsys.readouterr().out.count("No pad_token_id found in config/tokenizer, defaulting to 0") == 1
    with pytest.warns(UserWarning, match="defaulting to 0"):
        _run(SimpleNamespace(vocab_size=50))  # another config: said again


def test_eos_fallback_is_warned_once_per_tokenizer():
    config, tokenizer = SimpleNamespace(), SimpleNamespace(pad_token_id=None, eos_token_id=7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [detect_pad_token_id(config, tokenizer)[0] for _ in range(3)] == [7, 7, 7]
        detect_pad_token_id(config, SimpleNamespace(pad_token_id=None, eos_token_id=7))  # another tokenizer
    assert [w.filename for w in caught] == [__file__, __file__]


def test_warnings_are_written_above_an_open_bar(monkeypatch):
    out = io.StringIO()
    bar = tqdm(total=3, file=out)
    with warnings.catch_warnings():
        # pytest records warnings; stand in for Python's own printing, as in a script or notebook.
        monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda message: pytest.fail("bypassed the bar"))
        warnings.simplefilter("always")
        before = warnings.showwarning
        with warnings_through(bar):
            bar.update(1)
            warnings.warn("careful", UserWarning)
        assert warnings.showwarning is before  # restored
    bar.close()
    lines = out.getvalue().replace("\r", "\n").splitlines()
    assert any(line.endswith("UserWarning: careful") for line in lines)  # a line of its own, not glued to the bar


def test_a_recording_caller_keeps_its_warnings():
    bar = tqdm(total=1, file=io.StringIO())
    with pytest.warns(UserWarning, match="kept"):
        with warnings_through(bar):
            warnings.warn("kept", UserWarning)
    bar.close()
