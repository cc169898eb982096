"""What each accelerator chip can do, by `device.device_kind`: the one table the pod
planner (`tools/plan.py`) and the training log's MFU read."""
import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  peak_flops: float      # dense bf16 FLOP/s
  hbm_bytes: int
  hbm_bandwidth: float   # bytes/s
  ici_bandwidth: float   # bytes/s per chip, all links together


# Numbers from the vendors' pages, each named beside its chip.
CHIPS = {
    # cloud.google.com/tpu/docs/v4: 275 TFLOP/s, 32 GiB HBM2 at 1200 GB/s, ICI 2400 Gbps.
    "TPU v4": Chip(275e12, 32 * GiB, 1200e9, 300e9),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s, 16 GiB HBM2 at 819 GB/s, ICI 1600 Gbps.
    "TPU v5 lite": Chip(197e12, 16 * GiB, 819e9, 200e9),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s, 95 GiB HBM2e at 2765 GB/s, ICI 4800 Gbps.
    "TPU v5": Chip(459e12, 95 * GiB, 2765e9, 600e9),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s, 32 GiB HBM at 1640 GB/s, ICI 3584 Gbps.
    "TPU v6 lite": Chip(918e12, 32 * GiB, 1640e9, 448e9),
    # nvidia.com H100 / H200 SXM datasheets: 989 TFLOP/s dense bf16, NVLink 900 GB/s;
    # HBM3 80 GB at 3.35 TB/s, HBM3e 141 GB at 4.8 TB/s.
    "NVIDIA H100 80GB HBM3": Chip(989e12, 80 * 10**9, 3.35e12, 900e9),
    "NVIDIA H200": Chip(989e12, 141 * 10**9, 4.8e12, 900e9),
}
