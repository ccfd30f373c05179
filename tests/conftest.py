"""Suite-wide settings: one torch thread per test process.

The suite runs on 2-core machines, often beside other work; two competing torch threads there can run tiny
ops tens of times slower than one. One thread also keeps CPU results reproducible from run to run. RECTFLOW_CPU_BF16=1: the suite runs the bf16 paths
it tests on every CPU, also where the trainer would fall back to fp32 (rectflow.devices.native_bf16).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RECTFLOW_CPU_BF16", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
