"""Per-layer gradient norms (and 64-bin histograms) of chosen optimizer steps, held on the device until their step's
row is sent to W&B, their one consumer."""
from __future__ import annotations

import torch

from .logging_settings import LoggingSettings


class GradientStats:
    """Statistics of ``model``'s gradients, taken in the optimizer step (no host sync) and read with its row.

    Held until the row is flushed: logged at once they reached W&B before the buffered rows of earlier steps, which
    W&B then dropped as out of order. ``enabled`` is False while no W&B run is live (its start failed, or ended)."""

    def __init__(self):
        self.enabled = False
        self._held: dict[int, dict] = {}  # optimizer step -> its statistics, on the device

    def record_if_due(self, model, step: int, logging: LoggingSettings) -> None:
        """Every ``logging.log_grad_dist_every`` optimizer steps while a W&B run is live."""
        if self.enabled and step % logging.log_grad_dist_every == 0:
            self.record(model, step, histograms=logging.log_grad_histogram)

    def record(self, model, step: int, histograms: bool) -> None:
        """Of optimizer ``step``, before clipping, after AMP unscaling."""
        names, norms, counts, ranges = [], [], [], []
        for name, parameter in model.named_parameters():
            if parameter.grad is None:
                continue
            grad = parameter.grad.detach().float().flatten()
            names.append(name)
            norms.append(torch.linalg.vector_norm(grad))
            if histograms:
                # torch.histc's own range (min == max == 0) reads the data's min and max back to the host:
                # scale instead.
                low, high = torch.aminmax(grad)
                scaled = (grad - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny)
                counts.append(torch.histc(scaled, bins=64, min=0.0, max=1.0))
                ranges.append(torch.stack([low, high]))
        if names:
            self._held[step] = {"names": names, "norms": torch.stack(norms),
                                "counts": torch.stack(counts) if counts else None,
                                "ranges": torch.stack(ranges) if ranges else None}

    def held_steps(self) -> list[int]:
        return sorted(self._held)

    def pop_values(self, step: int, histogram) -> dict:
        """W&B values of ``step``'s statistics (one host read per step that has them), else {}; ``histogram`` builds
        a W&B histogram from ``np_histogram=(counts, edges)``."""
        held = self._held.pop(step, None)
        if held is None:
            return {}
        values = {f"gradients/{name}.norm": norm for name, norm in zip(held["names"], held["norms"].cpu().tolist())}
        if held["counts"] is not None:
            counts, ranges = held["counts"].cpu().numpy(), held["ranges"].cpu().double().numpy()
            for name, count, (low, high) in zip(held["names"], counts, ranges):
                edges = low + (high - low) * torch.linspace(0, 1, len(count) + 1, dtype=torch.float64).numpy()
                values[f"gradients/{name}"] = histogram(np_histogram=(count, edges))
        return values
