import os

import torch

os.environ.setdefault("WANDB_MODE", "disabled")
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on gloo
