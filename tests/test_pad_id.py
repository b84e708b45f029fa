"""Pad id detection order (issue 2, scenario 5)."""
from types import SimpleNamespace

import pytest

from utils.tier3_training_utilities import _detect_pad_token_id, test_fine_tuning


def test_config_pad_id_comes_first():
    assert _detect_pad_token_id(SimpleNamespace(pad_token_id=3), SimpleNamespace(pad_token_id=7)) == 3


def test_tokenizer_pad_id_when_config_has_none():
    assert _detect_pad_token_id(SimpleNamespace(pad_token_id=None), SimpleNamespace(pad_token_id=50256)) == 50256


def test_config_tokenizer_is_used_when_no_tokenizer_argument():
    config = SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=11))
    assert _detect_pad_token_id(config) == 11


def test_tokenizer_without_pad_attribute_falls_back_to_zero_with_warning():
    with pytest.warns(UserWarning, match="No pad_token_id found"):
        assert _detect_pad_token_id(SimpleNamespace(), object()) == 0


def test_tokenizer_with_pad_none_uses_eos_with_warning():
    with pytest.warns(UserWarning, match="eos_token_id"):
        assert _detect_pad_token_id(SimpleNamespace(), SimpleNamespace(pad_token_id=None, eos_token_id=50256)) == 50256


def test_none_config_and_tokenizer():
    with pytest.warns(UserWarning, match="defaulting to 0"):
        assert _detect_pad_token_id(None) == 0


def test_library_functions_named_test_are_not_collected():
    assert test_fine_tuning.__test__ is False
