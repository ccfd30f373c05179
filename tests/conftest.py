"""Suite-wide settings: one torch thread per test process.

The suite runs on 2-core machines, often beside other work; two competing torch threads there can run tiny
ops tens of times slower than one. One thread also keeps CPU results reproducible from run to run.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
