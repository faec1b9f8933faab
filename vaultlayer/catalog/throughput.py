"""How fast a GPU class trains, relative to one V100: the prior the placement policy ranks pools by until
the run has measured its own speed on them (`workflows/speed.py`).

Source: NVIDIA's data sheets, peak dense (no sparsity) FP16/BF16 Tensor Core TFLOPS, divided by the V100
SXM2's 125; read 2026-12. Peak FLOPS overstate the newer classes' lead on real training (a data loader, small
kernels and communication do not scale with them: A100 -> H100 is often 2x in practice against 3.2x on paper),
which is why measured steps per second replace the prior after minutes of training on a pool, and why a pool
may give its own `speed` (config `speed: 2.1`, `vl run --speed`).
"""

from __future__ import annotations

THROUGHPUT_AS_OF = "2026-12"
RELATIVE_THROUGHPUT: dict[str, float] = {
    "K80": 0.07,  # 8.7 TFLOPS FP32 (no Tensor Cores), per GPU of the board
    "P4": 0.04,  # 5.5 TFLOPS FP32
    "P100": 0.15,  # 18.7 TFLOPS FP16
    "T4": 0.52,  # 65
    "V100": 1.0,  # 125 (SXM2)
    "A10G": 0.56,  # about 70: not on an NVIDIA data sheet (an A10 at lower clocks); as commonly reported
    "A10": 1.0,  # 125
    "L4": 0.97,  # 121
    "L40S": 2.9,  # 362
    "A100": 2.5,  # 312
    "A100-80GB": 2.5,  # 312
    "H100": 7.9,  # 989 (SXM)
    "H200": 7.9,  # 989
}


def prior_speed(gpu: str | None, count: int) -> float | None:
    """One host's speed relative to one V100: the class's, times the GPUs it has. None for an unknown class
    (the policy then takes every such pool as equally fast); hosts without GPUs are 1."""
    if gpu is None:
        return 1.0
    per_gpu = RELATIVE_THROUGHPUT.get(gpu) or RELATIVE_THROUGHPUT.get(gpu.upper())
    return per_gpu * max(count, 1) if per_gpu is not None else None
