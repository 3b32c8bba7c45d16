import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on gloo
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels in the CPU interpreter; set before they import
