"""PNG plots of a run (loss, perplexity, learning rate, gradient norm), shown inline in notebooks."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"
    except ImportError:
        return False


def show_inline(png_path) -> None:
    """Show a saved PNG in a Jupyter/Colab notebook (whatever matplotlib backend is active); nothing elsewhere."""
    if _in_notebook():
        from IPython.display import Image, display

        display(Image(filename=str(png_path)))


def save_training_plots(epochs, steps, output_dir: Path) -> dict[str, str]:
    """Two figures: per-epoch losses/perplexity, and per-step learning rate/gradient norm."""
    figure = Figure(figsize=(11, 4))
    loss_ax, ppl_ax = figure.subplots(1, 2)
    loss_ax.plot(epochs["epoch"], epochs["train/loss_excl_padding"], "o-", label="train")
    loss_ax.plot(epochs["epoch"], epochs["val/loss_excl_padding"], "s-", label="validation")
    loss_ax.set(title="Loss (excl. padding)", xlabel="epoch", ylabel="cross-entropy per real token")
    loss_ax.legend()
    ppl_ax.plot(epochs["epoch"], epochs["val/perplexity"], "s-", color="tab:green")
    ppl_ax.set(title="Validation perplexity (excl. padding)", xlabel="epoch")
    figure.tight_layout()

    step_figure = Figure(figsize=(11, 4))
    lr_ax, grad_ax = step_figure.subplots(1, 2)
    lr_ax.plot(steps["step"], steps["train/learning_rate"])
    lr_ax.set(title="Learning rate", xlabel="optimizer step")
    grad_ax.plot(steps["step"], steps["train/grad_norm"], color="tab:red")
    grad_ax.set(title="Gradient norm (before clipping)", xlabel="optimizer step")
    step_figure.tight_layout()

    paths = {"loss": output_dir / "loss_and_perplexity.png", "steps": output_dir / "learning_rate_and_grad_norm.png"}
    figure.savefig(paths["loss"], dpi=100)
    step_figure.savefig(paths["steps"], dpi=100)
    show_inline(paths["loss"])
    show_inline(paths["steps"])
    return {name: str(path) for name, path in paths.items()}
