"""Building blocks of the fine-tuning loop: loss, data, model calls, metrics, distributed, checkpoints."""
