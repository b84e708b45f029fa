"""Padding-correct training utilities for small causal language models."""
