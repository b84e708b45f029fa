"""The loss seam: THE masked LM loss and the real-token rule, the linear (memory-lean) loss, the loss path rule
the model call that produces logits or loss sums, and the bytes per token that turn a loss into bits per byte."""
from .linear_loss import linear_masked_lm_loss
from .loss_path import LossPathChoice, choose_loss_path, chunked, logits_changed_after_head, memory_verdict
from .masked import (IGNORE_INDEX, TokenSums, batch_targets, count_real_targets, masked_lm_loss, real_target_bytes,
                     real_token_mask, rows_per_chunk, shifted_targets)
from .model_call import (ModelCaller, eval_mode, extract_logits, hf_causal_lm_class_names, mask_free_is_exact,
                         output_layer_of, unwrap, vocab_size_of)
from .token_bytes import bits_per_byte, byte_lengths_tensor, check_token_bytes, token_byte_lengths

__all__ = ["IGNORE_INDEX", "LossPathChoice", "ModelCaller", "TokenSums", "batch_targets", "bits_per_byte",
           "byte_lengths_tensor", "check_token_bytes", "choose_loss_path", "chunked", "count_real_targets",
           "eval_mode", "extract_logits", "hf_causal_lm_class_names", "linear_masked_lm_loss",
           "logits_changed_after_head", "mask_free_is_exact", "masked_lm_loss", "memory_verdict", "output_layer_of",
           "real_target_bytes", "real_token_mask", "rows_per_chunk", "shifted_targets", "token_byte_lengths", "unwrap",
           "vocab_size_of"]
