"""Every precision branch runs on CPU when asked for (issue 35): bf16 and fp16 autocast, the GradScaler's skipped
steps and scale growth, its state in checkpoints and an exact resume; the previous keywords keep their CUDA-only
meaning. The SIGKILL resume of each precision is a row of tests/test_conformance.py."""
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from models import InfGradient, StopAtForward, TinyCausalLM, random_lines
from utils.tier3_training_utilities import evaluate_perplexity, test_fine_tuning
from utils.training.checkpoints import load_checkpoint
from utils.training.precision import Precision

VOCAB, PAD = 50, 0
CONFIG = SimpleNamespace(vocab_size=VOCAB, pad_token_id=PAD)
TRAIN, VAL = random_lines(20, seed=1), random_lines(8, seed=2)
QUIET = dict(progress=False, save_plots=False)


class OverflowAt(nn.Module):
    """TinyCausalLM whose ``at``-th training forward gets an infinite gradient; records the weights seen at each
    training forward (= the weights after the previous optimizer step, with one micro-batch per step)."""

    def __init__(self, at):
        super().__init__()
        torch.manual_seed(0)
        self.lm, self.at, self.calls, self.seen = TinyCausalLM(vocab_size=VOCAB), at, 0, []

    def forward(self, idx):
        logits = self.lm(idx)
        if self.training:
            self.calls += 1
            self.seen.append(self.lm.head.weight.detach().clone())
            if self.calls == self.at:
                return InfGradient.apply(logits)
        return logits


def _train(model, **options):
    return test_fine_tuning(model, CONFIG, TRAIN, VAL, **dict(dict(n_epochs=2, batch_size=4, learning_rate=3e-3,
                                                                   shuffle=False), **QUIET, **options))


@pytest.fixture(scope="module")
def runs():
    results = {}
    for precision in ("fp32", "bf16", "fp16"):
        torch.manual_seed(0)
        model = TinyCausalLM(vocab_size=VOCAB)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an explicit precision on CPU is no longer warned and ignored
            results[precision] = (model, _train(model, precision=precision))
    return results


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_train_on_cpu_close_to_float32_but_not_equal(runs, precision):
    model, result = runs[precision]
    fp32 = runs["fp32"][1]
    assert result["precision_used"] == precision and result["amp_enabled"] is True
    assert result["final_loss_scale"] == (65536.0 if precision == "fp16" else None)  # GradScaler's initial scale
    # The target: within 2% of float32 (one rounding of bf16 is 2**-8 = 0.4%; a run accumulates more).
    assert result["final_val_loss"] == pytest.approx(fp32["final_val_loss"], rel=0.02)
    assert result["final_val_loss"] != fp32["final_val_loss"]  # the autocast really ran
    assert result["loss_history"] != fp32["loss_history"]
    # Validation ran under the same autocast: evaluate_perplexity (float32) on the trained model differs from it.
    assert evaluate_perplexity(model, VAL, CONFIG)["loss"] != result["final_val_loss"]
    with torch.autocast("cpu", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision]):
        # Same batches as the run's validation (batch_size): the same half-precision roundings.
        assert (evaluate_perplexity(model, VAL, CONFIG, batch_size=4)["loss"]
                == pytest.approx(result["final_val_loss"], rel=1e-6))


def test_previous_keywords_keep_their_cuda_only_meaning_and_precision_overrides():
    with pytest.warns(UserWarning, match="CUDA only.*pass precision='fp16'"):
        result = _train(TinyCausalLM(vocab_size=VOCAB), n_epochs=1, max_steps=2, use_amp=True)
    assert result["precision_used"] == "fp32" and result["settings"]["use_amp"] is True
    with pytest.warns(UserWarning, match="CUDA only.*pass precision='bf16'"):
        assert _train(TinyCausalLM(vocab_size=VOCAB), n_epochs=1, max_steps=2,
                      mixed_precision="bf16")["precision_used"] == "fp32"
    # Asked for with precision= as well: the explicit request, which runs on CPU.
    assert _train(TinyCausalLM(vocab_size=VOCAB), n_epochs=1, max_steps=2, use_amp=True,
                  precision="fp16")["precision_used"] == "fp16"


def test_gradscaler_skips_an_overflowed_step_and_training_goes_on():
    at = 5  # optimizer step 5 (one micro-batch per step)
    model = OverflowAt(at)
    result = _train(model, precision="fp16")
    assert result["outcome"].kind.value == "completed" and result["global_step"] == model.calls
    assert torch.equal(model.seen[at], model.seen[at - 1])  # step 5's update was not applied
    assert not torch.equal(model.seen[at - 1], model.seen[at - 2])  # the steps around it were
    assert not torch.equal(model.seen[at + 1], model.seen[at])
    assert not torch.isfinite(torch.tensor(result["grad_norm_history"][at - 1]))
    assert result["final_loss_scale"] == 65536.0 / 2  # halved once; growth needs 2000 clean steps


def test_float32_stops_at_a_non_finite_gradient_with_the_weights_before_it():
    """The fused-AdamW found_inf path (no GradScaler): the flagged step is not applied and the run stops."""
    at = 5
    model = OverflowAt(at)
    result = _train(model, precision="fp32")
    assert result["non_finite"] and result["global_step"] == at - 1
    assert torch.equal(model.lm.head.weight, model.seen[at - 1])


def test_scaler_grows_its_scale_and_backs_off_on_the_same_lines_as_on_a_gpu():
    torch.manual_seed(0)
    layer = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    amp = Precision("fp16", "cpu", init_scale=8.0, growth_interval=2)
    scales, weights = [], []
    for step in range(5):
        with amp.autocast():
            loss = layer(torch.ones(2, 4)).float().pow(2).sum()
        amp.scaler.scale(loss).backward()
        if step == 3:
            layer.weight.grad[0, 0] = float("inf")
        amp.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(layer.parameters(), float("inf"))
        before = layer.weight.detach().clone()
        amp.step(optimizer, amp.skip_update(torch.zeros(()), grad_norm))
        weights.append(torch.equal(before, layer.weight))
        scales.append(amp.loss_scale())
        optimizer.zero_grad()
    assert scales == [8.0, 16.0, 16.0, 8.0, 8.0]  # doubled after 2 clean steps, halved at the overflow
    assert weights == [False, False, False, True, False]  # only the overflowed step was skipped
    assert amp.state_dict()["scale"] == 8.0


def test_fp16_checkpoints_carry_the_scaler_and_a_resume_continues_exactly(tmp_path):
    options = dict(precision="fp16", output_dir=str(tmp_path / "run"), checkpoint_every=3)
    torch.manual_seed(0)
    reference_model = StopAtForward(TinyCausalLM(vocab_size=VOCAB))
    reference = _train(reference_model, **dict(options, output_dir=str(tmp_path / "full")))
    torch.manual_seed(0)
    stopped = _train(StopAtForward(TinyCausalLM(vocab_size=VOCAB), at=8), **options)  # Ctrl-C in step 8
    assert stopped["interrupted"] and stopped["global_step"] == 7
    files = load_checkpoint(Path(stopped["last_checkpoint"]))
    assert files["meta"]["step"] == 6 and files["trainer_state.pt"]["scaler"]["scale"] == 65536.0
    torch.manual_seed(1)  # other initial weights: the checkpoint replaces them
    resumed_model = StopAtForward(TinyCausalLM(vocab_size=VOCAB))
    resumed = _train(resumed_model, **dict(options, resume_from_checkpoint=True))
    assert resumed["resumed_from_step"] == 6 and resumed["precision_used"] == "fp16"
    assert resumed["loss_history"] == reference["loss_history"]  # same process, same kernels: bit-identical
    assert resumed["final_val_loss"] == reference["final_val_loss"]
    for p, q in zip(resumed_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
