"""How the suite compares numbers made by floating-point kernels with numbers made elsewhere.

Two kinds of comparison, and only two:
- **Bit-identity**, a promise that holds on every CPU: the same computation twice on one machine (resume vs an
  uninterrupted run, a stored state vs training it, strength 0 vs the base, a file written and read back). Those use
  `torch.equal`.
- **Within a few ulps**, for numbers whose last bits depend on the CPU's kernels (BLAS, LAPACK, convolutions,
  attention pick their code path and summation order by CPU family and by `ATEN_CPU_CAPABILITY`) compared with
  numbers made elsewhere: a file shipped in the repository, a constant, another machine. Those use `assert_ulps`.
"""
import torch


def assert_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 8, what: str = "") -> None:
    """Equal to within `ulps` units in the last place of the tensor's scale (its largest magnitude): a different
    summation order moves each result by a few ulps of the largest terms that went into it, not of itself, so an
    element that comes out near zero may differ by more than its own ulp."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = ulps * torch.finfo(expected.dtype).eps * max(scale, torch.finfo(expected.dtype).tiny)
    worst = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert worst <= bound, f"{what}: differs by {worst:.3g}, more than {ulps} ulps of {scale:.3g} ({bound:.3g})"
