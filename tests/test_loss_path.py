"""Issue 35, the loss path rule: the linear path (hidden states x head weight) only where it is the model's own loss
by construction and where it saves memory; every other model trains, and reports, exactly what its own forward and
F.cross_entropy give, and its own forward and hooks run every step. The previous module's helpers equal the main path.

Each training case runs the package with ``loss_path="linear"`` (the linear path wherever it is exact, whatever the
memory rule says: tiny models would otherwise take the chunked path for memory reasons alone) against an
independent loop: the same initial weights, the model's own forward, F.cross_entropy, fused AdamW.
"""
import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.models import tiny_gpt2
from utils.tier3_training_utilities import (_compute_loss_and_backward, _run_validation_epoch, evaluate_perplexity,
                                            test_fine_tuning)
from utils.training.loss import choose_loss_path, logits_changed_after_head, memory_verdict
from utils.training.loss import ModelCaller, extract_logits

VOCAB, LENGTH, LR, EPOCHS, BATCH = 64, 12, 3e-3, 2, 4
LINEAR_ASKED = {"loss_path": "linear"}


def _lines(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB - 1, (n, LENGTH), generator=generator).tolist()  # no pad (0), no EOS (VOCAB - 1)


class HiddenHead(nn.Module):
    """forward_hidden + output_head (the opt-in form of the linear path); ``after`` acts on the head's logits."""

    def __init__(self, after="none", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, 32)
        self.mix = nn.Linear(32, 32)
        self.output_head = nn.Linear(32, VOCAB)
        self.after = after
        if after == "scale":
            self.logit_scale = nn.Parameter(torch.ones(()))  # 1 at initialisation: the loss cannot show it
        if after == "offset":
            self.logit_offset = nn.Parameter(torch.zeros(VOCAB))  # 0 at initialisation: likewise

    def forward_hidden(self, input_ids):
        return torch.tanh(self.mix(self.embed(input_ids).cumsum(dim=1) / 4))  # causal: a prefix sum

    def forward(self, input_ids):
        logits = self.output_head(self.forward_hidden(input_ids))
        if self.after == "softcap":
            return 10.0 * torch.tanh(logits / 10.0)  # ~the identity for the small logits of initialisation
        if self.after == "scale":
            return logits * self.logit_scale
        if self.after == "offset":
            return logits + self.logit_offset
        return logits


def _gemma2(cap, logit_gain=1.0):
    """Gemma 2 from a tiny config; ``logit_gain`` raises its final norm's gain (larger logits from the start)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          final_logit_softcapping=cap, pad_token_id=0, eos_token_id=VOCAB - 1, bos_token_id=VOCAB - 1,
                          sliding_window=16)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.fill_(logit_gain - 1)  # Gemma's RMSNorm scales by (1 + weight)
    return model


def _counting_gpt2():
    from transformers import GPT2LMHeadModel

    class CountingGPT2(GPT2LMHeadModel):  # a user's subclass: its forward does something the user relies on
        training_calls = 0

        def forward(self, *args, **kwargs):
            self.training_calls += self.training
            return super().forward(*args, **kwargs)

    base = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=0)
    model = CountingGPT2(base.config)
    model.load_state_dict(base.state_dict())
    return model


def _hooked_gpt2():
    """Hooks on the model: a forward pre-hook with kwargs and a forward hook (logging, a stop button, an auxiliary
    term); each counts its training calls."""
    model = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=0)
    model.training_calls = model.training_calls_after = 0

    def before(module, args, kwargs):
        module.training_calls += module.training

    def after(module, args, output):
        module.training_calls_after += module.training

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after)
    return model


# (model, learning rate): the soft-capped models start with small logits (where a cap is ~the identity, so a probe
# at initialisation passes) and train fast enough for their logits to reach the cap within the run's 8 steps.
CASES = {
    "gemma2_cap30": (lambda: _gemma2(30.0, logit_gain=4.0), 1e-2),
    "gemma2_cap5": (lambda: _gemma2(5.0), 1e-2),
    "softcap_in_forward": (lambda: HiddenHead("softcap"), 1e-2),
    "learnable_scale": (lambda: HiddenHead("scale"), LR),
    "learnable_offset": (lambda: HiddenHead("offset"), LR),
    "subclass_forward": (_counting_gpt2, LR),
    "forward_hooks": (_hooked_gpt2, LR),
}


def _config_of(model):
    return getattr(model, "config", None) or types.SimpleNamespace(vocab_size=VOCAB, pad_token_id=0)


def _reference(model, train, val, lr=LR):
    """The model's own forward, F.cross_entropy, fused AdamW over the same batches: step losses and val loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0,
                                  fused=True)
    model.train()
    step_losses = []
    for _ in range(EPOCHS):
        for start in range(0, len(train), BATCH):
            ids = torch.tensor(train[start:start + BATCH])
            logits = extract_logits(model(ids)).float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(val)
        logits = extract_logits(model(ids)).float()
        val_loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    return step_losses, val_loss


def _train(model, train, val, tmp_path, lr=LR, **options):
    return test_fine_tuning(model, _config_of(model), train, val, n_epochs=EPOCHS, batch_size=BATCH, learning_rate=lr,
                            weight_decay=0.0, shuffle=False, lr_schedule="constant", warmup_steps=0,
                            gradient_clip_norm=None, progress=False, save_plots=False, output_dir=str(tmp_path),
                            **options)


def _relative(a, b):
    return abs(a / b - 1)


@pytest.mark.parametrize("case", list(CASES))
def test_models_whose_loss_is_not_the_heads_train_with_their_own_forward(case, tmp_path):
    train, val = _lines(16, seed=1), _lines(8, seed=2)
    build, lr = CASES[case]
    model = build()
    reference_model, initial = copy.deepcopy(model), copy.deepcopy(model)
    reference_model.training_calls = reference_model.training_calls_after = 0
    result = _train(model, train, val, tmp_path, lr=lr, **LINEAR_ASKED)
    step_losses, val_loss = _reference(reference_model, train, val, lr)

    assert len(result["loss_history"]) == len(step_losses) == result["global_step"]
    for got, want in zip(result["loss_history"], step_losses):
        assert _relative(got, want) < 1e-5
    assert _relative(result["final_val_loss"], val_loss) < 1e-5
    # Weights relative to how far training moved them: Adam turns rounding noise in a near-zero gradient (GPT-2's
    # key bias, which softmax ignores) into steps of the learning rate's size, so an absolute bound would be either
    # loose or kernel-dependent. Measured noise: <= 5.4e-4 of the update; the defects: 2e-2 to 1.
    for (name, got), want, start in zip(model.named_parameters(), reference_model.parameters(), initial.parameters()):
        assert (got - want).norm() <= 1e-2 * (want - start).norm() + 1e-7, name
    # The validation a run reports is evaluate_perplexity's number for the trained model.
    assert _relative(result["final_val_loss"], evaluate_perplexity(model, val, config=_config_of(model))["loss"]) < 1e-6
    if hasattr(model, "training_calls"):  # the user's forward or hook ran in every training step
        assert model.training_calls == result["global_step"] == reference_model.training_calls
    if hasattr(model, "training_calls_after"):
        assert model.training_calls_after == result["global_step"]
    assert result["loss_path"] == "chunked", result.get("loss_path_reason")


def test_a_plain_hf_model_keeps_the_linear_path_and_its_validation_equals_evaluate_perplexity(tmp_path):
    train, val = _lines(16, seed=1), _lines(8, seed=2)
    model = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=0)
    reference_model = copy.deepcopy(model)
    result = _train(model, train, val, tmp_path, **LINEAR_ASKED)
    step_losses, val_loss = _reference(reference_model, train, val)
    assert result["loss_path"] == "linear", result["loss_path_reason"]
    assert all(_relative(got, want) < 1e-5 for got, want in zip(result["loss_history"], step_losses))
    assert _relative(result["final_val_loss"], val_loss) < 1e-5
    assert _relative(result["final_val_loss"], evaluate_perplexity(model, val)["loss"]) < 1e-6


def test_the_default_takes_the_chunked_path_where_the_logits_are_small(tmp_path):
    train, val = _lines(16, seed=1), _lines(8, seed=2)
    result = _train(tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=0), train, val, tmp_path)
    assert result["loss_path"] == "chunked" and "small" in result["loss_path_reason"]


def test_the_memory_rule_picks_the_linear_path_for_a_gpt2_vocabulary_only_at_large_batches():
    head = nn.Linear(128, 50257, bias=False)  # GPT-2's vocabulary on a 2 x 128 model: ~6.9M parameters
    model = nn.Sequential(nn.Embedding(1024, 128), nn.Linear(128, 512), nn.Linear(512, 128), head)
    assert memory_verdict(model, head, positions=16 * 256) is None  # 823 MB of float32 logits: benchmarks/memory.py
    assert "small" in memory_verdict(model, head, positions=16 * 64)  # 206 MB
    # A model of 1.07B more parameters (on the meta device: sizes only) holds 17 GB of weights, gradients and AdamW
    # state: 823 MB of logits are below 1/16 of that, so the faster path runs.
    huge = nn.Sequential(model, nn.Linear(32768, 32768, device="meta"))
    assert "1/16" in memory_verdict(huge, head, positions=16 * 256)


def test_configs_that_change_logits_after_the_head_are_named_and_neutral_values_are_not():
    from transformers import CohereConfig, Gemma2Config, GraniteConfig

    hits = {name: logits_changed_after_head(types.SimpleNamespace(config=config)) for name, config in {
        "gemma2": Gemma2Config(), "cohere": CohereConfig(), "granite": GraniteConfig(logits_scaling=8.0),
        "falcon_h1_like": types.SimpleNamespace(to_dict=lambda: {"lm_head_multiplier": 0.5}),
        "nested": types.SimpleNamespace(to_dict=lambda: {"text_config": {"final_logit_softcapping": 30.0}}),
    }.items()}
    assert "final_logit_softcapping" in hits["gemma2"] and "logit_scale" in hits["cohere"]
    assert "logits_scaling" in hits["granite"] and "lm_head_multiplier" in hits["falcon_h1_like"]
    assert "text_config.final_logit_softcapping" in hits["nested"]
    # Attention soft-caps act inside the body (which the linear path runs as it is); neutral values change nothing.
    for config in (Gemma2Config(final_logit_softcapping=None), GraniteConfig(logits_scaling=1.0),
                   CohereConfig(logit_scale=1.0)):
        assert logits_changed_after_head(types.SimpleNamespace(config=config)) is None


def test_a_global_module_hook_or_a_hook_on_the_head_keeps_the_models_own_forward():
    model = tiny_gpt2(vocab_size=VOCAB, n_layer=2, pad_token_id=0)
    ids = torch.tensor(_lines(2, seed=3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def choose():
        return choose_loss_path(model, ModelCaller(model), batch, 0, micro_batch_positions=ids.numel(),
                                requested="linear")
    assert choose().path == "linear"
    handle = nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert choose().path == "chunked" and "global" in choose().reason
    finally:
        handle.remove()
    handle = model.lm_head.register_forward_hook(lambda module, args, output: None)
    assert choose().path == "chunked" and "output layer" in choose().reason
    handle.remove()
    assert choose().path == "linear"


def test_the_probe_leaves_the_model_bit_for_bit_as_it_was():
    model = HiddenHead("scale")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    ids = torch.tensor(_lines(2, seed=3))
    choice = choose_loss_path(model, ModelCaller(model), {"input_ids": ids}, 0, micro_batch_positions=24,
                              requested="linear")
    assert choice.path == "chunked" and "logit_scale" in choice.reason
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and model.training


# -- the previous module's helpers ----------------------------------------------------------------------
def _gpt2_eos_lines():
    """GPT-2 with pad = EOS, lines ending in their EOS (the case where the pad == EOS rule decides a target)."""
    model = tiny_gpt2(vocab_size=VOCAB, n_layer=2)  # pad_token_id None: the pad id is the tokenizer's / EOS
    eos = model.config.eos_token_id
    model.config.pad_token_id = eos
    lengths = (5, 3, 4)
    lines = [line[:n - 1] + [eos] for line, n in zip(_lines(3, seed=4), lengths)]
    return model, eos, lines


def _independent_loss(model, lines):
    """Per line, unpadded: the model's own forward and F.cross_entropy over every next token, the EOS included."""
    total, count = 0.0, 0
    for line in lines:
        ids = torch.tensor([line])
        logits = extract_logits(model(ids)).float()
        total = total + F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        count += len(line) - 1
    return total, count


def test_run_validation_epoch_equals_evaluate_perplexity_with_pad_equal_to_eos():
    model, eos, lines = _gpt2_eos_lines()
    helper = _run_validation_epoch(model, lines, eos)
    public = evaluate_perplexity(model, lines)
    with torch.no_grad():
        total, count = _independent_loss(model.eval(), lines)
    assert helper["real_tokens"] == public["tokens"] == count == 9
    assert helper["loss"] == public["loss"]  # the same computation on the same batches
    assert _relative(helper["loss"], total.item() / count) < 1e-5


def test_compute_loss_and_backward_gives_the_training_loss_and_gradients(tmp_path):
    model, eos, lines = _gpt2_eos_lines()
    width = max(map(len, lines))
    padded = torch.tensor([line + [eos] * (width - len(line)) for line in lines])  # no mask: the pad rule decides
    sums = _compute_loss_and_backward(model, {"input_ids": padded}, eos)
    helper_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    total, count = _independent_loss(model, lines)
    (total / count).backward()
    assert int(sums.real_targets) == count == 9
    assert _relative(float(sums.loss_sum), total.item()) < 1e-5
    for name, p in model.named_parameters():
        torch.testing.assert_close(helper_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The same first step as training on these lines (one micro-batch): its recorded loss is the helper's.
    result = test_fine_tuning(model, model.config, lines, lines, n_epochs=1, batch_size=3, shuffle=False,
                              progress=False, save_plots=False, output_dir=str(tmp_path))
    assert _relative(result["loss_history"][0], float(sums.loss_sum) / count) < 1e-6
