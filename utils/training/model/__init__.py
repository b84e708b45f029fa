"""The model seam: the model checked against the data, the start-up probes of its behaviour, the pad id, and how
the run calls and wraps the model."""
from .checks import ModelSizes, check_model_against_data, check_parameter_values, max_positions, tokenizer_size
from .model_settings import ModelSettings
from .model_setup import set_up_model
from .pad_id import detect_pad_token_id, pad_is_eos
from .probes import probe_model

__all__ = ["ModelSettings", "ModelSizes", "check_model_against_data", "check_parameter_values", "detect_pad_token_id",
           "max_positions", "pad_is_eos", "probe_model", "set_up_model", "tokenizer_size"]
