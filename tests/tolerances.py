"""Float tolerances that follow from the arithmetic, not from one machine's kernels.

torch picks its CPU kernels per instruction set (``ATEN_CPU_CAPABILITY=default|avx2|avx512``): a float32 sum of
n terms is accumulated in another order on another CPU (other vector widths, other blocking), so results differ
in the last bits from machine to machine. The rounding error of a sum of n terms is at most about
``n * eps * sum(|terms|)``; a gradient entry or a loss is such a sum, and the largest compared value bounds the
size of its terms. So a float32 comparison allows ``n * eps`` relative to the magnitude of the compared values:
any summation order passes, a wrong mask or divisor (errors of 1e-3 and more) fails. Bit-identity is claimed
only for the same operations on the same kernels (a resume against the uninterrupted run in the same kind of
process), never across kernel sets.
"""
import torch

EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7


def assert_close_float32(got: torch.Tensor, want: torch.Tensor, terms: int, msg=None) -> None:
    """``got`` equals ``want`` up to the rounding of float32 sums of ``terms`` terms (relative to the magnitude)."""
    magnitude = float(want.detach().abs().max())
    torch.testing.assert_close(got, want, rtol=0, atol=terms * EPS32 * max(magnitude, EPS32), msg=msg)
