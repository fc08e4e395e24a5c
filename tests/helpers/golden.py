"""Comparing with the PyTorch golden tensors (../shared/golden/README.md: tolerance and layouts)."""

import numpy as np


def assert_close(got, ref):
    """The golden README's tolerance: rtol 1e-5, atol 1e-5 · max(1, max|ref|)."""
    ref = np.asarray(ref)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def nhwc(a):
    """The goldens' NCHW images/latents → our NHWC."""
    return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))
