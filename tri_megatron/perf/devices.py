"""Device figures: the dense bf16 tensor-core peak of known GPUs (MFU is always against these) and
the memory / bandwidth figures of the GPU types the layout model plans for.

Pure Python; ``detect_peak_tflops`` imports torch only when called.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

# Dense (no sparsity) bf16 tensor-core peak of one device, TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H100": 989.0,  # H100 SXM5 (and H800 / GH200: same SM count and clocks)
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H800": 989.0,
    "GH200": 989.0,
    "H200": 989.0,  # H200 SXM: H100's compute with more, faster memory
    "H200 NVL": 835.0,
    "B200": 2250.0,  # HGX B200
    "GB200": 2500.0,
    "A100": 312.0,
    "A800": 312.0,
}


def peak_tflops_for_device(name: str) -> Optional[float]:
    """Dense bf16 peak for a CUDA device name such as ``NVIDIA H100 80GB HBM3``; None if unknown."""
    # longest key first, so that 'H100 PCIe' wins over 'H100' and 'GB200' over 'B200'
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def detect_peak_tflops() -> Optional[float]:
    """Dense bf16 peak of the current CUDA device (None on CPU or for an unknown chip)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops_for_device(torch.cuda.get_device_name())


@dataclasses.dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float  # dense bf16
    memory_gib: float  # what the device reports as total
    hbm_tbps: float
    intra_busbw_gbps: float  # achievable NCCL bus bandwidth inside a node (NVLink), GB/s per GPU
    inter_busbw_gbps: float  # achievable bus bandwidth across nodes, GB/s per GPU (one NIC per GPU)


# Defaults: achievable bus bandwidth ~80% of the link's one-direction rate (NVLink 4: 450 GB/s;
# NVLink 5: 900 GB/s; one 400 Gb/s NDR InfiniBand NIC per GPU: 50 GB/s).
GPU_SPECS = {
    "h100": GPUSpec("H100 SXM 80GB", 989.0, 79.6, 3.35, 360.0, 40.0),
    "h200": GPUSpec("H200 SXM 141GB", 989.0, 140.4, 4.8, 360.0, 40.0),
    "b200": GPUSpec("B200 180GB", 2250.0, 178.4, 8.0, 720.0, 40.0),
}
