"""Building blocks of the fine-tuning loop: the run (engine, trainer, settings) above one subpackage per seam."""
