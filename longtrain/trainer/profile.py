"""One training step traced by torch.profiler (train.profile_step): where the step's time goes, comm included."""
import os
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile


def trace_dir(run_dir: str, step: int) -> str:
    """Where every rank writes its trace of `step` (rank<r>.json.gz: a gzipped Chrome trace, as Perfetto opens it)."""
    return os.path.join(run_dir, "profile", f"step_{step:08d}")


@contextmanager
def traced(run_dir: str, step: int, rank: int, device: torch.device):
    """Record CPU (and CUDA) activity of the body, with operator shapes, into this rank's trace of `step`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    os.makedirs(trace_dir(run_dir, step), exist_ok=True)
    prof.export_chrome_trace(os.path.join(trace_dir(run_dir, step), f"rank{rank}.json.gz"))
