"""The model seam: the model checked against the data, the pad id, and how the run calls and wraps the model."""
from .checks import check_model_against_data, tokenizer_size
from .model_setup import set_up_model
from .pad_id import detect_pad_token_id, pad_is_eos

__all__ = ["check_model_against_data", "detect_pad_token_id", "pad_is_eos", "set_up_model", "tokenizer_size"]
