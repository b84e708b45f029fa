"""Issue 29: the chunked loss and the linear (no full logits) path give the full-logits numbers and gradients,
excluded targets get exactly zero gradient, and no full-size float32 tensor is kept for backward."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tests.models import TinyCausalLM, tiny_gpt2
from tests.tolerances import assert_close_float32
from utils.training.loss import linear_masked_lm_loss
from utils.training.loss import IGNORE_INDEX, masked_lm_loss, rows_per_chunk
from utils.training.loss import choose_loss_path
from utils.training.loss import ModelCaller, output_layer_of

PAD = 0


def use_linear_loss_if_exact(model, caller, batch, pad_token_id):
    """The linear path wherever it is the model's own loss (the memory rule aside: these models are tiny)."""
    return choose_loss_path(model, caller, batch, pad_token_id, micro_batch_positions=batch["input_ids"].numel(),
                            requested="linear").path == "linear"


def _batch(rows=3, seq=12, vocab=64, seed=0):
    """Right-padded rows of different lengths, one label -100, one row without any real target."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    mask[-1, 1:] = 0  # one real token: no real target in this row
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[1, 4] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference(logits, batch):
    """Independent: slice, shift and mask by hand, F.cross_entropy over all positions at once."""
    mask = batch["attention_mask"].bool()
    counted = mask[:, 1:] & mask[:, :-1] & (batch["labels"][:, 1:] != IGNORE_INDEX)
    targets = torch.where(counted, batch["labels"][:, 1:], IGNORE_INDEX)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    real = targets.reshape(-1) != IGNORE_INDEX
    correct = (flat.argmax(-1) == targets.reshape(-1)) & real  # random logits: no ties
    return loss, int(real.sum()), int(correct.sum())


@pytest.mark.parametrize("chunk_rows", [1, 5, None])
def test_chunked_loss_equals_one_cross_entropy_in_value_accuracy_and_gradient(chunk_rows):
    batch = _batch()
    logits = torch.randn(3, 12, 64, requires_grad=True)
    sums = masked_lm_loss(logits, batch["input_ids"], batch["labels"], batch["attention_mask"], PAD,
                          chunk_rows=chunk_rows)
    (sums.loss_sum / 3).backward()
    chunked_grad = logits.grad.clone()
    logits.grad = None
    loss, real, correct = _reference(logits, batch)
    (loss / 3).backward()
    torch.testing.assert_close(sums.loss_sum, loss, rtol=5e-6, atol=0)
    assert ((int(sums.real_targets), int(sums.correct), int(sums.sequences), int(sums.positions))
            == (real, correct, 2, 22))
    torch.testing.assert_close(chunked_grad, logits.grad, rtol=1e-5, atol=1e-7)


def test_excluded_targets_get_exactly_zero_gradient_whatever_their_logits():
    batch = _batch()
    excluded = torch.ones(3, 12, dtype=torch.bool)
    excluded[0, :6] = excluded[1, :11] = False
    excluded[1, 3] = True  # predicts the -100 label
    logits = torch.randn(3, 12, 64)
    grads = []
    for fill in (0.0, 1e4, float("nan")):
        changed = logits.masked_fill(excluded[..., None], fill).requires_grad_()
        masked_lm_loss(changed, batch["input_ids"], batch["labels"], batch["attention_mask"], PAD,
                       chunk_rows=4).loss_sum.backward()
        grads.append(changed.grad)
    assert torch.all(grads[0][excluded] == 0) and torch.all(grads[0][~excluded].abs().sum(-1) > 0)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])  # bit for bit, no NaN leaks in


class _FullSizeWrites(TorchDispatchMode):
    """Names of the ops that write a tensor of ``numel`` elements (a whole chunk), views and few-row writes aside."""

    FEW_ROWS = ("scatter_add_", "index_fill_", "empty", "view", "alias", "as_strided", "slice", "reshape", "detach")

    def __init__(self, numel):
        super().__init__()
        self.numel, self.names = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if (isinstance(out, torch.Tensor) and out.numel() == self.numel
                and not any(name.startswith(few) for few in self.FEW_ROWS)):
            self.names.append(name)
        return out


def test_backward_of_a_chunk_makes_two_passes_over_it_on_cpu():
    """Issue 44's throughput target: the gradient of a chunk is one fused softmax and one scaling pass. The
    earlier backward (subtract the log-sum-exp, exp_, a broadcast masked_fill_, mul_) made four, with the
    slower exponential: 3x F.cross_entropy's backward on CPU, 0.93x 93855a2's training tokens/s (CLAUDE.md)."""
    batch = _batch(rows=4, seq=16, vocab=256)
    logits = torch.randn(4, 16, 256, requires_grad=True)
    loss = masked_lm_loss(logits, batch["input_ids"], batch["labels"], batch["attention_mask"], PAD).loss_sum
    with _FullSizeWrites(logits.numel()) as writes:
        loss.backward()
    assert sorted(writes.names) == ["mul_", "softmax"], writes.names


def test_batch_without_real_targets_is_zero_not_nan_on_both_paths():
    ids = torch.zeros(2, 6, dtype=torch.long)
    logits = torch.randn(2, 6, 16, requires_grad=True)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    for sums, leaves in ((masked_lm_loss(logits, ids, pad_token_id=0), [logits]),
                         (linear_masked_lm_loss(hidden, weight, None, ids, pad_token_id=0), [hidden, weight])):
        assert int(sums.real_targets) == 0 and sums.loss_sum.item() == 0.0
        sums.loss_sum.backward()
        assert all(torch.all(leaf.grad == 0) for leaf in leaves)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_loss_equals_the_full_logits_loss_and_gradients_for_two_chunk_sizes(with_bias):
    batch = _batch(rows=4, seq=9, vocab=50)
    torch.manual_seed(1)
    hidden = torch.randn(4, 9, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    loss, real, correct = _reference(F.linear(hidden, weight, bias), batch)
    expected = torch.autograd.grad(loss, leaves)
    # Each loss term is a log-sum-exp over 50 logits; each gradient entry a sum over the 36 positions (weight, bias)
    # or the 50 vocabulary rows (hidden): float32 sums of at most 50 terms, in another order on other kernels.
    terms = 50
    for chunk_rows in (3, 64):
        sums = linear_masked_lm_loss(hidden, weight, bias, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                     PAD, chunk_rows=chunk_rows)
        assert_close_float32(sums.loss_sum, loss, terms=36 + terms)  # 36 targets, each a log-sum-exp of 50
        assert (int(sums.real_targets), int(sums.correct)) == (real, correct)
        for got, want in zip(torch.autograd.grad(sums.loss_sum, leaves), expected):
            assert_close_float32(got, want, terms=terms)


def test_linear_path_excluded_targets_change_nothing_bit_for_bit():
    """Another hidden state or token id at an excluded target leaves every gradient identical."""
    batch = _batch(rows=3, seq=10, vocab=40)
    torch.manual_seed(2)
    weight = torch.randn(40, 8, requires_grad=True)
    hidden = torch.randn(3, 10, 8)
    excluded = torch.tensor([[False] * 6 + [True] * 4, [False] * 9 + [True], [True] * 10])
    excluded[1, 3] = True  # predicts the -100 label
    grads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        changed = torch.where(excluded[..., None], torch.randn_like(hidden) * 100, hidden).requires_grad_()
        ids = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.randint(1, 40, (3, 10)))
        sums = linear_masked_lm_loss(changed, weight, None, ids, batch["labels"], batch["attention_mask"], PAD,
                                     chunk_rows=4)
        grads.append(torch.autograd.grad(sums.loss_sum, [changed, weight]))
    assert torch.all(grads[0][0][excluded] == 0)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


class HiddenAndHead(nn.Module):
    """A user's model that opts in: ``forward_hidden`` and ``output_head`` (with a bias)."""

    def __init__(self, vocab=48, d_model=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.mix = nn.Linear(d_model, d_model)
        self.output_head = nn.Linear(d_model, vocab)

    def forward_hidden(self, input_ids):
        h = self.embed(input_ids)
        return torch.tanh(self.mix(h.cumsum(dim=1)))  # causal: each position sees only its prefix

    def forward(self, input_ids):
        return self.output_head(self.forward_hidden(input_ids))


def _first_step_gradients(model, batch, linear):
    caller = ModelCaller(model)
    if linear:
        assert use_linear_loss_if_exact(model, caller, batch, PAD) and caller.loss_path == "linear"
        sums = caller.loss_sums(model, batch, PAD)
    else:
        sums = _reference(caller(model, batch), batch)[0]
    model.zero_grad(set_to_none=True)
    (sums.loss_sum if linear else sums).backward()
    return (sums.loss_sum if linear else sums).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [lambda: tiny_gpt2(vocab_size=96, n_layer=2), lambda: HiddenAndHead()],
                         ids=["hf_gpt2", "custom_forward_hidden"])
def test_first_step_loss_and_gradients_of_the_linear_path_equal_the_full_logits_path(build):
    model = build()
    batch = _batch(rows=4, seq=16, vocab=48)
    lean_loss, lean = _first_step_gradients(model, batch, linear=True)
    full_loss, full = _first_step_gradients(model, batch, linear=False)
    assert abs(lean_loss.item() / full_loss.item() - 1) < 5e-6
    assert lean.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(lean[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


class ScaledLogitsGPT2(nn.Module):
    """A Hugging Face model whose forward scales the head's logits (as soft-capping or logit_scale would)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_gpt2(vocab_size=48)
        self.config, self.base_model_prefix = self.inner.config, "transformer"
        self.transformer = self.inner.transformer

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits * 0.5


class BrokenHidden(HiddenAndHead):
    def forward_hidden(self, input_ids):
        raise RuntimeError("no hidden states today")

    def forward(self, input_ids):
        return self.output_head(torch.tanh(self.mix(self.embed(input_ids).cumsum(dim=1))))


@pytest.mark.parametrize("model", [ScaledLogitsGPT2(), BrokenHidden(), TinyCausalLM(vocab_size=48)],
                         ids=["scaled_logits", "raising_body", "logits_only"])
def test_models_the_linear_path_does_not_fit_keep_their_own_forward(model):
    caller = ModelCaller(model)
    batch = _batch(rows=3, seq=10, vocab=48)
    assert not use_linear_loss_if_exact(model, caller, batch, PAD)
    assert caller.loss_path == "chunked" and caller.output_layer is None
    loss, real, _ = _reference(caller(model, batch), batch)
    sums = caller.loss_sums(model, batch, PAD)
    torch.testing.assert_close(sums.loss_sum, loss, rtol=5e-6, atol=0)
    assert output_layer_of(TinyCausalLM()) is None


def _saved_tensors(compute):
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel(), tensor.data_ptr()))
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compute()
    return saved


def test_no_full_size_float32_tensor_is_kept_for_backward():
    """The issue's finding: under autocast the old loss kept a float32 copy (and log-softmax) of all the logits."""
    batch = _batch(rows=4, seq=32, vocab=512)
    logits = torch.randn(4, 32, 512, dtype=torch.bfloat16, requires_grad=True)
    saved = _saved_tensors(lambda: masked_lm_loss(logits, batch["input_ids"], batch["labels"],
                                                  batch["attention_mask"], PAD, chunk_rows=16))
    assert all(not (dtype == torch.float32 and numel >= 4 * 32 * 512) for dtype, numel, _ in saved), saved
    # The linear path keeps nothing of the logits' size at all.
    hidden = torch.randn(4, 32, 16, requires_grad=True)
    weight = torch.randn(512, 16, requires_grad=True)
    saved = _saved_tensors(lambda: linear_masked_lm_loss(hidden, weight, None, batch["input_ids"], batch["labels"],
                                                         batch["attention_mask"], PAD, chunk_rows=16))
    assert max(numel for _, numel, _ in saved) <= weight.numel()


def test_chunks_are_sized_by_memory_not_by_count():
    assert rows_per_chunk(50257) == 64 * 2**20 // (4 * 50257)  # ~64 MB of float32 logits per chunk
    assert rows_per_chunk(64) > 100_000 and rows_per_chunk(10**9) == 1


def test_autocast_keeps_the_loss_in_float32_and_gradients_in_the_parameters_dtype():
    """What this CPU machine can check of mixed precision: dtypes, and agreement with the model's own bf16 head."""
    model = HiddenAndHead()
    batch = _batch(rows=3, seq=10, vocab=48)
    caller = ModelCaller(model)
    assert use_linear_loss_if_exact(model, caller, batch, PAD)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = caller.loss_sums(model, batch, PAD)
        full = masked_lm_loss(model(batch["input_ids"]), batch["input_ids"], batch["labels"], batch["attention_mask"],
                              PAD)
    assert lean.loss_sum.dtype == full.loss_sum.dtype == torch.float32
    torch.testing.assert_close(lean.loss_sum, full.loss_sum, rtol=1e-5, atol=0)  # same bf16 logits, fp32 sums
    lean.loss_sum.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())


def _train(model, switch_off_linear, tmp_path):
    from utils.tier3_training_utilities import test_fine_tuning

    generator = torch.Generator().manual_seed(3)
    sequences = [torch.randint(1, 48, (int(n),), generator=generator).tolist()
                 for n in torch.randint(4, 20, (24,), generator=generator)]
    return test_fine_tuning(model, model.config, sequences[:16], sequences[16:], n_epochs=1, batch_size=4,
                            learning_rate=1e-3, progress=False, save_plots=False, output_dir=str(tmp_path),
                            loss_path="chunked" if switch_off_linear else "linear")


def test_the_engine_decides_the_path_once_and_trains_the_same_weights(tmp_path):
    """A whole run on the linear path ends where the same run on the model's own logits ends."""
    lean_model, full_model = tiny_gpt2(vocab_size=48, pad_token_id=PAD), tiny_gpt2(vocab_size=48, pad_token_id=PAD)
    lean = _train(lean_model, False, tmp_path / "lean")
    full = _train(full_model, True, tmp_path / "full")
    assert (lean["loss_path"], full["loss_path"]) == ("linear", "chunked")
    assert abs(lean["final_val_loss"] / full["final_val_loss"] - 1) < 5e-5
    for (name, a), b in zip(lean_model.state_dict().items(), full_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
