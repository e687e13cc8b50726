"""tests/gpu/checks.py under pytest: skipped without a CUDA device (every CI run here)."""

from __future__ import annotations

import pytest
import torch

import checks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name, fn, args", checks.all_checks(), ids=[name for name, _, _ in checks.all_checks()])
def test_gpu_check(name, fn, args, tmp_path):
    fn(str(tmp_path), *args)
