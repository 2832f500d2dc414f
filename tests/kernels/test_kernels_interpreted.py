"""Runs the kernel tests under Triton's interpreter on CPU (in a child process: TRITON_INTERPRET must be set
before triton is imported). On a GPU machine the kernel tests run compiled instead and this is skipped."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).with_name("test_block_attnres_kernels.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the kernels run compiled on this machine")
def test_kernels_match_reference_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-2000:]
