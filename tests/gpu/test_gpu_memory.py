"""``--gpu-memory-gib auto`` on a real GPU: what ``cai plan`` reads of a node's GPUs (NVML, else
``nvidia-smi``) is what CUDA reports. `bash tests/gpu/run.sh` (docs/gpu.md); CUDA only."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only")


def test_the_memory_read_for_the_plan_is_what_cuda_reports():
    from workflows.runtime.devices import read_gpu_memory

    memory, source = read_gpu_memory()
    assert memory, f"nothing read: {source}"
    cuda = sorted(torch.cuda.get_device_properties(i).total_memory / (1 << 30)
                  for i in range(torch.cuda.device_count()))
    # NVML counts the whole device; CUDA a little less (what the driver reserves): within 2%
    assert min(memory) == pytest.approx(cuda[0], rel=0.02), (memory, source, cuda)
