"""Tiny models for tests: a plain causal transformer (forward(x) -> logits) and a tiny HF GPT-2."""
import os
import signal
import threading

import torch
from torch import nn

from utils.training.checkpoints import WRITER_THREAD_PREFIX


class TinyCausalLM(nn.Module):
    """A plain nn.Module the way users write them: forward(idx) returns logits, no attention_mask."""

    def __init__(self, vocab_size=50, d_model=32, n_heads=2, n_layers=1, max_len=128, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        # bias=False: the key bias gets only rounding-noise gradients (softmax ignores it), which Adam would
        # amplify into updates that differ with batch shape.
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 2 * d_model, dropout=dropout, batch_first=True, bias=False)
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx):
        seq = idx.shape[1]
        h = self.embed(idx) + self.pos(torch.arange(seq, device=idx.device))
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        return self.head(self.blocks(h, mask=causal, is_causal=True))


def tiny_gpt2(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=128, dropout=0.0, pad_token_id=None, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_positions=n_positions,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, pad_token_id=pad_token_id,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    return GPT2LMHeadModel(config)


def random_lines(n=24, seed=0, low=3, high=20, vocab_size=50):
    """``n`` token lines of random lengths in [low, high) and ids in [1, vocab_size) (0 stays the pad id)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (int(torch.randint(low, high, (1,), generator=g)),), generator=g)
            for _ in range(n)]


def wait_for_checkpoint_writes():
    for thread in threading.enumerate():
        if thread.name.startswith(WRITER_THREAD_PREFIX):
            getattr(thread, "before_join", lambda: None)()  # the training thread's verdict the write waits for
            thread.join()


class InfGradient(torch.autograd.Function):
    """Identity forward; backward returns an infinite gradient (an fp16 overflow, made on purpose)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class StopAtForward(nn.Module):
    """Wraps ``lm``; at its ``at``-th training forward it raises KeyboardInterrupt (a notebook's stop button) or,
    with ``kill=True``, SIGKILLs its own process (no clean-up can run). ``at=None``: never."""

    def __init__(self, lm, at=None, kill=False):
        super().__init__()
        self.lm, self.at, self.kill, self.calls = lm, at, kill, 0

    def forward(self, idx):
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                if self.kill:
                    # Checkpoints are written in the background: the kill comes once the ones already taken are
                    # complete, so "the last checkpoint before the kill" is known (kills during writes: the soak).
                    wait_for_checkpoint_writes()
                    os.kill(os.getpid(), signal.SIGKILL)
                raise KeyboardInterrupt
        return self.lm(idx)


def KillableLM(kill_at=None, vocab_size=50, dropout=0.0):  # noqa: N802 - reads like the class it builds
    """A TinyCausalLM that SIGKILLs its own process at training forward ``kill_at``."""
    return StopAtForward(TinyCausalLM(vocab_size=vocab_size, dropout=dropout), kill_at, kill=True)


class ForwardWritesLM(nn.Module):
    """A TinyCausalLM whose training forward changes its own state in place, as users' models do: a frozen
    ``nn.Parameter`` holding an EMA of the hidden states (used by the forward), a running-statistics buffer, and a
    trained parameter shrunk under ``no_grad`` before use. ``ballast`` floats of an unused trained parameter come
    first in the state dict, so a background copy reaches the others late (after the next forward has begun).
    ``history[k]``: those tensors as step k left them (taken at the start of training forward k + 1)."""

    def __init__(self, vocab_size=50, d_model=32, ballast=0, record=False, dropout=0.0):
        super().__init__()
        self.ballast = nn.Parameter(torch.zeros(ballast))
        self.lm = TinyCausalLM(vocab_size=vocab_size, d_model=d_model, dropout=dropout)
        self.ema = nn.Parameter(torch.zeros(d_model), requires_grad=False)
        self.gain = nn.Parameter(torch.ones(d_model))
        self.register_buffer("running_mean", torch.zeros(d_model))
        self.record, self.history = record, []

    def written(self) -> dict:
        return {"ema": self.ema.detach().clone(), "gain": self.gain.detach().clone(),
                "running_mean": self.running_mean.clone()}

    def forward(self, idx):
        lm, seq = self.lm, idx.shape[1]
        h = lm.embed(idx) + lm.pos(torch.arange(seq, device=idx.device))
        if self.training:
            if self.record:
                self.history.append(self.written())
            with torch.no_grad():
                mean = h.detach().float().mean(dim=(0, 1))
                self.ema.mul_(0.9).add_(0.1 * mean)
                self.running_mean.mul_(0.5).add_(0.5 * mean)
                self.gain.mul_(0.999)
        h = (h + self.ema) * self.gain
        causal = nn.Transformer.generate_square_subsequent_mask(seq, device=idx.device)
        return lm.head(lm.blocks(h, mask=causal, is_causal=True))


class BlockedPickle:
    """Pickling waits for ``release``: a write held inside its serialisation (a real pickle, nothing replaced)."""

    def __init__(self):
        self.pickling, self.release = threading.Event(), threading.Event()

    def __deepcopy__(self, memo):
        return self  # the snapshot keeps it as it is

    def __reduce__(self):
        self.pickling.set()
        assert self.release.wait(timeout=60)
        return (dict, ())
