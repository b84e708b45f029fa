"""Which loss path a run takes, decided once at start-up, and why (``results["loss_path_reason"]``).

* ``"linear"``: hidden states from the model's body times the head's weight (:mod:`linear_loss`); the full
  logits never exist. Only where that *is* the model's own loss by construction:

  - a Hugging Face model's ``forward`` is transformers' own (a user's subclass overriding it, or an instance
    attribute replacing it, would be skipped), and its config names nothing that changes the logits after the
    head (soft-caps, logit scales and multipliers: Gemma 2/3, Cohere, Granite, Falcon-H1, ...);
  - no forward or backward hook (nor pre-hook, with or without kwargs) on the model or its head, and no global
    module hook: the linear path calls neither of them;
  - a probe on two rows, with the head's weight scaled up so that the logits are large (a soft-cap of small
    logits is ~the identity, ``30 * tanh(x / 30) ~ x``), gives the model's own loss **and every parameter's
    gradient** (a learnable post-head scale set to 1 or offset set to 0 changes no loss, only gradients);
  - and it buys memory (:func:`memory_verdict`): the float32 logits of the largest micro-batch are large, in
    bytes and against the weights, gradients and AdamW state. Otherwise the faster chunked path runs.

* ``"chunked"``: the model's own forward, then :func:`loss.masked_lm_loss` over its logits in chunks. Always
  exact: whatever the model's forward, hooks or config do happens.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .masked import masked_lm_loss
from .model_call import ModelCaller, OutputLayer, output_layer_of

# The memory rule (CLAUDE.md, "Loss path"): the linear path saves about the model's float32 logits and their
# gradient, and costs one more head matmul per chunk in backward (measured on CPU: slower). Worth it only where
# those logits are large in bytes AND not small against the state every step holds anyway.
LINEAR_MIN_LOGITS_BYTES = 256 * 2**20
LINEAR_MIN_STATE_FRACTION = 1 / 16
ADAMW_COPIES = 4  # a trainable parameter holds its value, its gradient and AdamW's two moments

# Config attributes that act on the logits after the head. Attention-logit caps act inside the body (the linear
# path runs the body as it is), router logits belong to mixture-of-experts layers.
_POST_HEAD = re.compile(r"soft_?cap|logits?_scal|logit_scale|logits?_multiplier|lm_head_multiplier|output_multiplier")
_INSIDE_BODY = re.compile(r"attn|attention|router")

# The probe's logits: root mean square about this, so a soft-cap (Gemma 2: 30) changes them visibly.
PROBE_LOGIT_RMS = 20.0
PROBE_LOSS_RTOL = 1e-4
PROBE_GRAD_RTOL = 1e-3


@dataclass(frozen=True)
class LossPathChoice:
    path: str  # "linear" or "chunked"
    reason: str


def chunked(reason: str) -> LossPathChoice:
    return LossPathChoice("chunked", reason)


def choose_loss_path(model: nn.Module, caller: ModelCaller, probe_batch: Mapping, pad_token_id: int, *,
                     micro_batch_positions: int, requested: str = "auto") -> LossPathChoice:
    """The path for ``model`` (``caller.output_layer`` is set when it is linear) and the reason for it.

    ``micro_batch_positions`` bounds the positions (rows x columns) of the run's largest micro-batch, for the
    memory rule; ``requested="linear"`` skips that rule (never the exactness ones), ``"chunked"`` decides at once.
    """
    caller.output_layer = None
    if requested == "chunked":
        return chunked("loss_path='chunked' was asked for")
    layer = output_layer_of(model)
    if layer is None:
        return chunked(f"{type(model).__name__} names no output layer (neither a Hugging Face causal LM with an "
                       "nn.Linear head nor forward_hidden + output_head): the loss is taken over its own forward's "
                       "logits")
    why_not = user_code_skipped(model, layer) or logits_changed_after_head(model)
    if why_not:
        return chunked(why_not)
    memory = memory_verdict(model, layer.head, micro_batch_positions)
    if requested == "auto" and memory:
        return chunked(memory)
    mismatch = probe_mismatch(model, caller, layer, probe_batch, pad_token_id)
    if mismatch:
        return chunked(mismatch)
    caller.output_layer = layer
    why = ("loss_path='linear' was asked for" if requested == "linear" else
           f"the float32 logits of the largest micro-batch ({_mib(logits_bytes(layer.head, micro_batch_positions))}) "
           "are large against the rest of a step's memory")
    return LossPathChoice("linear", f"{why}; the model's forward, hooks and config leave its logits as the head gives "
                                    "them, and a probe at large logits matched its own loss and every gradient")


# -- by construction -----------------------------------------------------------------------------------
def _defining_class(cls: type, name: str) -> type:
    return next(klass for klass in cls.__mro__ if name in vars(klass))


def user_code_skipped(model: nn.Module, layer: OutputLayer) -> str | None:
    """What of the user's own code the linear path would not run: an overridden forward, or a hook."""
    if "forward" in vars(model) or _defining_class(type(model), "__call__") is not nn.Module:
        return f"{type(model).__name__}'s forward or __call__ is replaced on the model: the linear path would skip it"
    if layer.body is not None:  # Hugging Face: the forward must be transformers' own
        owner = _defining_class(type(model), "forward")
        if not owner.__module__.startswith("transformers."):
            return (f"{type(model).__name__}.forward is defined in {owner.__module__}.{owner.__qualname__}, not by "
                    "transformers: the linear path would skip it, so the model's own forward runs")
    for module, what in ((model, "the model"), (layer.head, "its output layer")):
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks"):
            if getattr(module, kind, None):
                return (f"{what} has {kind.strip('_').replace('_', ' ')} registered: the linear path would not call "
                        f"{what}, so its own forward runs")
    from torch.nn.modules import module as torch_module

    for kind in ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks"):
        if getattr(torch_module, kind, None):
            return (f"a global module hook is registered ({kind.strip('_').replace('_', ' ')}): the linear path would "
                    "not call the model and its head, so their own forward runs")
    return None


def _config_items(config, prefix: str = ""):
    values = config.to_dict() if hasattr(config, "to_dict") else (config if isinstance(config, Mapping) else {})
    for name, value in values.items():
        name = str(name)  # id2label has int keys
        if isinstance(value, Mapping):  # sub-configs (text_config of multimodal models) come as dicts
            yield from _config_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", name, value


def _neutral(name: str, value) -> bool:
    if value is None or value is False:
        return True
    if "cap" in name:  # a soft-cap is off only when unset
        return False
    values = value if isinstance(value, (list, tuple)) else [value]
    return all(isinstance(v, (int, float)) and float(v) == 1.0 for v in values)


def logits_changed_after_head(model: nn.Module) -> str | None:
    """A config entry that acts on the logits after the head, with a value that is not neutral."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    for path, name, value in _config_items(config):
        if _POST_HEAD.search(name) and not _INSIDE_BODY.search(name) and not _neutral(name, value):
            return (f"config.{path}={value!r} changes the logits after the head (a soft-cap or a logit scale): the "
                    "model's own forward gives them")
    return None


# -- what it buys --------------------------------------------------------------------------------------
def logits_bytes(head: nn.Linear, positions: int) -> int:
    return int(positions) * int(head.weight.shape[0]) * 4


def state_bytes(model: nn.Module) -> int:
    """Weights, gradients and AdamW moments: what every step holds whatever the loss path."""
    return sum(p.numel() * p.element_size() * (ADAMW_COPIES if p.requires_grad else 1) for p in model.parameters())


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def memory_verdict(model: nn.Module, head: nn.Linear, positions: int) -> str | None:
    """Why the linear path would not buy memory meaningfully here, or None when it would."""
    logits, state = logits_bytes(head, positions), state_bytes(model)
    if logits >= LINEAR_MIN_LOGITS_BYTES and logits >= LINEAR_MIN_STATE_FRACTION * state:
        return None
    return (f"the float32 logits of the largest micro-batch ({_mib(logits)}) are small (below "
            f"{_mib(LINEAR_MIN_LOGITS_BYTES)}, or below 1/{round(1 / LINEAR_MIN_STATE_FRACTION)} of the weights, "
            f"gradients and AdamW state: {_mib(state)}): the linear path would save little memory and run slower, so "
            "the model's own forward runs (loss_path='linear' forces it where exact)")


# -- the probe -----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _probe_mode(model: nn.Module):
    """Eval mode (no dropout: both passes see the same network) with gradients on; every module's mode back after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _scaled_head(head: nn.Linear, factor: float):
    """The head's weight and bias times ``factor`` for the block, then bit for bit what they were."""
    saved = [(p, p.detach().clone()) for p in (head.weight, head.bias) if p is not None]
    with torch.no_grad():
        for parameter, _ in saved:
            parameter.mul_(factor)
    try:
        yield
    finally:
        with torch.no_grad():
            for parameter, value in saved:
                parameter.copy_(value)


def _gradients(loss: torch.Tensor, parameters: list) -> list:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def probe_mismatch(model: nn.Module, caller: ModelCaller, layer: OutputLayer, batch: Mapping,
                   pad_token_id: int) -> str | None:
    """Compare the linear path with the model's own forward on two rows of ``batch``, at large logits: the loss
    and every trainable parameter's gradient. None when they agree; else what differed. Nothing of the model
    changes (weights restored bit for bit, no ``.grad`` written, modes restored)."""
    rows = batch["input_ids"].shape[0]
    # Two rows bound the probe's own logits (a 50k vocabulary: 2 x seq x 200 KB).
    small = {k: (v[:2] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows else v)
             for k, v in batch.items()}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    parameters = [p for _, p in named]
    loss_of = lambda logits: masked_lm_loss(logits, small["input_ids"], small.get("labels"),  # noqa: E731
                                            small.get("attention_mask"), pad_token_id)
    try:
        with _probe_mode(model):
            with torch.no_grad():
                rms = caller(model, small).float().pow(2).mean().sqrt().item()  # start-up only: one host read
            factor = max(1.0, PROBE_LOGIT_RMS / max(rms, 1e-6))
            with _scaled_head(layer.head, factor):
                own = loss_of(caller(model, small))
                own_grads = _gradients(own.loss_sum, parameters)
                lean = caller.linear_sums(small, pad_token_id, layer)
                lean_grads = _gradients(lean.loss_sum, parameters)
    except Exception as error:  # noqa: BLE001 - any failure of the probe means: keep the model's own forward
        return f"the linear-path probe failed ({type(error).__name__}: {error}), so the model's own forward runs"
    if int(own.real_targets) == 0 or int(lean.real_targets) != int(own.real_targets):
        return "the probe batch has no real target to compare on, so the model's own forward runs"
    own_loss, lean_loss = own.loss_sum.double().item(), lean.loss_sum.double().item()
    if not abs(lean_loss - own_loss) <= PROBE_LOSS_RTOL * abs(own_loss):
        return (f"at large logits (head x {factor:.3g}) the hidden states x head weight give loss {lean_loss:.6g}, the "
                f"model's own forward {own_loss:.6g}: something acts on the logits after the head")
    total = torch.sqrt(sum(g.double().pow(2).sum() for g in own_grads)).item() if own_grads else 0.0
    for (name, _), want, got in zip(named, own_grads, lean_grads):
        off, size = (got.double() - want.double()).norm().item(), want.double().norm().item()
        if not off <= PROBE_GRAD_RTOL * size + 1e-6 * total:
            return (f"at large logits the gradient of {name} differs from the model's own forward's ({off:.3g} off, "
                    f"norm {size:.3g}): a parameter acts after the head (a learnable logit scale or offset), so the "
                    "model's own forward runs")
    return None
