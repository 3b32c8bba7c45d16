"""Peak memory per rank: the head + loss (full logits vs chunked), and one training step vs N and P.

CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) of a fresh process during the measured work, minus
its RSS just before it (model, optimizer and data built); CUDA: torch.cuda.max_memory_allocated minus
memory_allocated before. Every row prints the closed form of longtrain.trainer.memory_model beside it.
    python benchmarks/memory.py loss                                  # N/P = 16k tokens, vocab 32k, d 256
    python benchmarks/memory.py step --n 2048 4096 8192 --p 1 2       # table + benchmarks/memory.png
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, print_table  # noqa: E402
from longtrain.config import load_config  # noqa: E402
from longtrain.parallel.spawn import run_distributed  # noqa: E402
from longtrain.trainer.memory_model import loss_bytes, step_memory  # noqa: E402
from longtrain.trainer.model import LMHead  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
MODELS = {"tiny hybrid": ["model.pattern=gla*3,softmax", "parallel.linear_sp=lasp2"],
          "softmax": ["model.pattern=softmax"]}
MODES = {"off": [], "block": ["model.activation_checkpointing=true"],
         "mixer": ["model.activation_checkpointing=true", "model.checkpoint_mode=mixer"],
         "offload": ["train.offload_activations=true"]}
MB = 2 ** 20


def mark(device: torch.device) -> int:
    """Reset the peak and return the memory in use now (bytes)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return status_kb("VmRSS") * 1024


def peak(device: torch.device) -> int:
    """Peak memory since mark() (bytes)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return status_kb("VmHWM") * 1024


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def loss_worker(rank, world, tokens, vocab, d, chunk):
    """Peak bytes of forward + backward of the head and loss on random h [tokens, d]."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    head = LMHead(d, vocab, chunk).to(device)
    h = torch.randn(1, tokens, d, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (1, tokens), device=device)
    mask = torch.ones(1, tokens, dtype=torch.bool, device=device)
    before = mark(device)
    loss, _ = head(h, targets, mask)
    loss.backward()
    return peak(device) - before


def step_worker(rank, world, overrides):
    """Peak bytes above the built trainer of its first training step (gradients and AdamW state included)."""
    from longtrain.trainer.train import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(load_config(TINY, overrides + [f"run.dir={tmp}"]))
        before = mark(trainer.device)
        trainer.train_step()
        return peak(trainer.device) - before


def loss_table(args) -> list[dict]:
    rows = []
    for chunk in (0, args.chunk):
        measured = run_distributed(loss_worker, 1, args.tokens, args.vocab, args.d, chunk)[0]
        rows.append({"loss": "chunked" if chunk else "full logits", "chunk": chunk, "tokens": args.tokens,
                     "vocab": args.vocab, "d": args.d, "peak MB": measured / MB,
                     "estimate MB": loss_bytes(args.tokens, args.d, args.vocab, chunk) / MB})
    for row in rows:
        row["vs full"] = row["peak MB"] / rows[0]["peak MB"]
    return rows


def step_table(args) -> list[dict]:
    rows = []
    for model, mixers in MODELS.items():
        for mode in args.modes:
            for world in args.p:
                for n in args.n:
                    overrides = mixers + MODES[mode] + [
                        f"data.seq_len={n}", "data.batch_size=1", f"parallel.sp_size={world}", "train.eval_every=0",
                        "train.engine=fsdp", "run.resume=false", "run.progress=false", "wandb.mode=disabled"]
                    try:
                        measured = max(run_distributed(step_worker, world, overrides, timeout=600))
                    except RuntimeError as e:  # a failing configuration is a row, not the end of the sweep
                        print(f"{model} {mode} P={world} N={n} failed: {str(e).strip().splitlines()[-1]}")
                        measured = float("nan")
                    estimate = step_memory(load_config(TINY, overrides), world, gpu=torch.cuda.is_available())
                    rows.append({"model": model, "checkpointing": mode, "P": world, "N": n, "N/P": n // world,
                                 "peak MB/rank": measured / MB, "estimate MB": estimate["total"] / MB,
                                 "estimate/peak": estimate["total"] / measured})
                    print(rows[-1], {k: round(v / MB, 1) for k, v in estimate.items()}, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["loss", "step"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--p", type=int, nargs="+", default=[1, 2])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--out", default="benchmarks/memory.png")
    args = p.parse_args()
    if args.what == "loss":
        print_table(loss_table(args), ["loss", "chunk", "tokens", "vocab", "d", "peak MB", "estimate MB", "vs full"])
        return
    rows = step_table(args)
    print_table(rows, ["model", "checkpointing", "P", "N", "N/P", "peak MB/rank", "estimate MB", "estimate/peak"])
    plot(rows, "N", "peak MB/rank", ["model", "checkpointing", "P"], args.out, "peak memory per rank, one step")


if __name__ == "__main__":
    main()
