"""The parts of the GPU path that a CPU can check (issue 20): mask-free calls only where exact, precision
resolution, the distinct batch shapes a run reports, torch.compile as a keyword."""
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import TinyCausalLM, tiny_gpt2
from utils.tier3_training_utilities import test_fine_tuning
from utils.training.data import PaddingCollator, to_examples
from utils.training.loss import ModelCaller, mask_free_is_exact
from utils.training.previous_interface import settings_from_call
from utils.training.settings import FineTuneSettings

VOCAB, PAD = 50, 0


def _padded_batch(lengths=(12, 5, 9)):
    g = torch.Generator().manual_seed(0)
    lines = [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]
    return PaddingCollator(PAD)([(ex, True) for ex in to_examples(lines, PAD)])


def test_hf_causal_lm_gives_the_same_real_logits_without_the_mask():
    model = tiny_gpt2(vocab_size=VOCAB, pad_token_id=PAD).eval()
    batch = _padded_batch()
    assert batch["right_padded"] and (batch["attention_mask"] == 0).any()
    caller = ModelCaller(model)
    assert mask_free_is_exact(model, caller, batch)
    with torch.no_grad():
        with_mask = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        without = model(input_ids=batch["input_ids"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(without[real], with_mask[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(without[~real], with_mask[~real])  # only padding positions differ, and they never count


class GPT2LMHeadModel(nn.Module):
    """Named like a causal LM of transformers' mapping, but bidirectional: padding changes its real logits."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(is_encoder_decoder=False, vocab_size=VOCAB)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        hidden = self.embed(input_ids)
        weights = (torch.ones_like(input_ids, dtype=hidden.dtype) if attention_mask is None
                   else attention_mask.to(hidden.dtype))
        context = (hidden * weights[..., None]).sum(1, keepdim=True) / weights.sum(1, keepdim=True)[..., None]
        return self.head(hidden + context)


def test_models_that_need_the_mask_keep_it():
    batch = _padded_batch()
    torch.manual_seed(0)
    # The logits check catches it.
    assert not mask_free_is_exact(GPT2LMHeadModel(), ModelCaller(GPT2LMHeadModel()), batch)
    plain = TinyCausalLM(vocab_size=VOCAB)  # no attention_mask argument: nothing to drop
    assert not mask_free_is_exact(plain, ModelCaller(plain), batch)


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert FineTuneSettings().numerics.autocast_dtype(cpu) is None  # auto: fp32 on CPU
    assert FineTuneSettings(precision="bf16").numerics.autocast_dtype(cpu) == "bf16"  # explicit: CPU autocast (#35)
    assert settings_from_call({"use_amp": True})[0].numerics.autocast_dtype(cpu) is None  # previous keyword: CUDA only
    assert FineTuneSettings(precision="fp32").numerics.autocast_dtype(cuda) is None
    assert FineTuneSettings(precision="fp16").numerics.autocast_dtype(cuda) == "fp16"
    assert settings_from_call({"mixed_precision": "bf16"})[0].numerics.autocast_dtype(cuda) == "bf16"  # older keyword
    assert settings_from_call({"use_amp": True})[0].numerics.autocast_dtype(cuda) == "fp16"  # previous module's
    with pytest.raises(ValueError, match="pass only one"):
        settings_from_call({"precision": "bf16", "mixed_precision": "fp16"})


def test_auto_precision_is_silent_on_cpu_and_a_previous_keyword_is_warned():
    data = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(0)
        result = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), config, data, data, n_epochs=1, progress=False,
                                  save_plots=False)
    assert result["amp_enabled"] is False and result["precision_used"] == "fp32"
    assert result["attention_mask_free"] is False  # mask-free calls are a CUDA-only path
    with pytest.warns(UserWarning, match="CUDA only"):  # precision="bf16" itself runs on CPU: tests/test_precision.py
        test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), config, data, data, n_epochs=1, mixed_precision="bf16",
                         progress=False, save_plots=False)


def test_distinct_batch_shapes_are_reported():
    g = torch.Generator().manual_seed(1)
    lines = [torch.randint(1, VOCAB, (int(torch.randint(2, 30, (1,), generator=g)),), generator=g) for _ in range(20)]
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)

    def shapes(multiple):
        torch.manual_seed(0)
        result = test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), config, lines, lines[:4], n_epochs=2, batch_size=4,
                                  shuffle=False, pad_to_multiple_of=multiple, progress=False, save_plots=False)
        return result["metrics_summary"]["train/distinct_batch_shapes"].tolist()

    chunks = [lines[i:i + 4] for i in range(0, 20, 4)]  # shuffle=False: consecutive lines, the same each epoch
    exact = {(len(c), max(len(x) for x in c)) for c in chunks}
    bounded = {(len(c), -(-max(len(x) for x in c) // 16) * 16) for c in chunks}
    assert shapes(None) == [len(exact), len(exact)]
    assert shapes(16) == [len(bounded), len(bounded)] and len(bounded) < len(exact)


@pytest.mark.skipif(bool(os.environ.get("ATEN_CPU_CAPABILITY")),
                    reason="inductor picks its instruction set from the CPU, not from ATEN_CPU_CAPABILITY: forced "
                           "apart on torch 2.13 they give C++ errors ('default': 'at::vec' has not been declared) or "
                           "NaN losses ('avx2' on an avx512 CPU); eager kernels are what that setting tests")
def test_compile_trains_like_eager():
    g = torch.Generator().manual_seed(0)
    lines = [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(24)]
    config = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
    runs = []
    for compile_model in (False, True):
        torch.manual_seed(0)
        runs.append(test_fine_tuning(TinyCausalLM(vocab_size=VOCAB), config, lines, lines[:6], n_epochs=1,
                                     compile=compile_model, pad_to_multiple_of=32, shuffle=False, progress=False,
                                     save_plots=False))
    assert runs[1]["settings"]["compile"] is True
    assert runs[1]["loss_history"] == pytest.approx(runs[0]["loss_history"], rel=1e-5)
    assert runs[1]["metrics_summary"]["train/distinct_batch_shapes"].iloc[0] == 1  # one padded width: one compile
