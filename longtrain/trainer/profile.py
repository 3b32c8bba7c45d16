"""One training step traced by torch.profiler (train.profile_step): where the step's time goes, comm included."""
import os
from contextlib import contextmanager, nullcontext

import torch
from torch.profiler import ProfilerActivity, profile


def trace_path(run_dir: str, step: int, rank: int) -> str:
    """Where rank `rank` writes its trace of `step`: gzipped Chrome trace JSON, which Perfetto opens as it is."""
    return os.path.join(run_dir, "profile", f"step_{step:08d}", f"rank{rank}.json.gz")


@contextmanager
def traced(path: str, device: torch.device):
    """Record CPU (and CUDA) activity of the body, with operator shapes, into a Chrome trace at `path`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        yield
    os.makedirs(os.path.dirname(path), exist_ok=True)
    prof.export_chrome_trace(path)


def maybe_traced(run_dir: str, step: int, profile_step: int, rank: int, device: torch.device):
    """`traced` for the step numbered `profile_step`, a no-op for every other step."""
    return traced(trace_path(run_dir, step, rank), device) if step == profile_step else nullcontext()
