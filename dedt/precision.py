"""Float32 precision on CUDA: TF32 or IEEE, set so that every getter torch and inductor read agrees.

torch 2.9 added per-backend ``fp32_precision`` flags beside the legacy ``allow_tf32`` ones. Setting
only the new flags leaves the legacy getters (``torch.backends.cuda.matmul.allow_tf32``,
``torch.backends.cudnn.allow_tf32``, ``torch.get_float32_matmul_precision()``, which inductor's
max-autotune paths read) raising "a mix of the legacy and new APIs". The legacy setters update both
sets of flags, so dedt sets precision through them. Neither touches the CPU (oneDNN) flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Within: TF32 cuBLAS matmuls and cuDNN convolutions iff ``enabled``, IEEE fp32 otherwise
    (cuDNN convolutions default to TF32). The caller's flags are restored on exit."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    new = (matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    legacy = _legacy_tf32()
    matmul.allow_tf32 = enabled
    cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        if legacy is not None:
            matmul.allow_tf32, cudnn.allow_tf32 = legacy
        matmul.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = new


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Within: IEEE fp32 arithmetic whatever the caller enabled: no TF32, no autocast. Metric
    features (FID's Inception above all) are defined in fp32; TF32 and bf16 shift them."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(tf32(False))
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():  # autocast("cuda") warns on a machine without CUDA
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def _legacy_tf32() -> tuple[bool, bool] | None:
    """The legacy (matmul, cuDNN) TF32 flags, or None when the caller mixed the two APIs (then
    only its new-API flags can be restored)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None
