"""Kernel speed: Triton flash attention vs torch SDPA (flash backend), Triton linear attention vs fla's chunk_gla.

GPU:  python benchmarks/kernels.py                 # bf16, causal, N 1k..64k, D 64 and 128; table + PNG
CPU:  TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke   # interpreter at a tiny size, checks only
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import plot, table_header, table_line  # noqa: E402
from longtrain.plan.cost import ATTENTION_BWD_RATIO, OpShape, attention_flop_count, linear_flop_count  # noqa: E402

TOKENS = 16384  # batch * N held fixed, so every N does comparable work


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=50)


COLUMNS = ["kernel", "D", "N", "mode", "ms", "TFLOP/s", "max err"]


def emit(rows: list[dict], kernel: str, D: int, N: int, err: float, timings: list[tuple[str, float, float]]) -> None:
    """Add a kernel's (mode, ms, FLOPs) rows and print them at once: a step cut short by its time limit keeps
    the rows measured so far."""
    for mode, ms, flops in timings:
        rows.append({"kernel": kernel, "D": D, "N": N, "mode": mode, "ms": ms, "TFLOP/s": flops / ms / 1e9,
                     "max err": err})
        print(table_line(rows[-1], COLUMNS), flush=True)


def fwd_bwd_timings(fn, inputs: list, dout, fwd_flops: float, bwd_ratio: float) -> list[tuple[str, float, float]]:
    """(mode, ms, FLOPs) of fn's forward, its backward (bwd_ratio times the forward's FLOPs) and both."""
    out = fn()
    return [("fwd", bench_ms(fn), fwd_flops),
            ("bwd", bench_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)),
             bwd_ratio * fwd_flops),
            ("fwd+bwd", bench_ms(lambda: torch.autograd.grad(fn(), inputs, dout)), (1 + bwd_ratio) * fwd_flops)]


def flash_rows(sizes: list[int], head_dims: list[int], rows: list[dict]) -> None:
    """Causal bf16 attention, ours (Triton) and SDPA's flash kernel; max err of each output vs fp32 SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from longtrain.attention import softmax_attention
    for D in head_dims:
        H = 2048 // D
        for N in sizes:
            B = max(1, TOKENS // N)
            q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            with torch.no_grad():
                want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)

            def ours():
                return softmax_attention(q, k, v, backend="triton")[0]

            def sdpa():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

            for name, fn in (("triton", ours), ("sdpa-flash", sdpa)):
                with torch.no_grad():
                    err = (fn().float() - want).abs().max().item()
                flops = attention_flop_count(OpShape(B, N, H, H, D), N * (N + 1) / 2)
                emit(rows, name, D, N, err, fwd_bwd_timings(fn, [q, k, v], dout, flops, ATTENTION_BWD_RATIO))
            del want
            torch.cuda.empty_cache()


def linear_rows(sizes: list[int], head_dims: list[int], rows: list[dict], baseline: bool) -> None:
    """GLA (per-channel decay) through the public op, or (baseline) fla's chunk_gla, bf16; max err vs the torch path
    in fp32. Ours runs at every shape first: fla autotunes many configs, and a run cut short still shows ours."""
    from longtrain.attention import linear_attention
    if baseline:
        try:
            from fla.ops.gla import chunk_gla
        except Exception as e:  # not installed, or built for another Triton
            print(f"fla's chunk_gla unavailable ({type(e).__name__}: {e}): linear kernel shown without that baseline")
            return
    for D, N in ((D, N) for D in head_dims for N in sizes):
        H, B = 2048 // D, max(1, TOKENS // N)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, H, N, D, device="cuda")) / 16
        dout = torch.randn_like(v)
        with torch.no_grad():
            want, _ = linear_attention(q.float(), k.float(), v.float(), log_decay=g, backend="torch")
        fwd_flops = sum(linear_flop_count(OpShape(B, N, H, H, D, chunk=64), B * N * H))
        if baseline:
            inputs = [t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v, g)]  # [B, N, H, D]
            name, grad_out = "fla-chunk_gla", dout.transpose(1, 2)
            fn = lambda: chunk_gla(*inputs)[0]  # noqa: E731
            to_bhnd = lambda out: out.transpose(1, 2)  # noqa: E731
        else:
            inputs = [t.clone().requires_grad_() for t in (q, k, v, g)]
            name, grad_out = "triton-gla", dout
            fn = lambda: linear_attention(*inputs[:3], log_decay=inputs[3], backend="triton")[0]  # noqa: E731
            to_bhnd = lambda out: out  # noqa: E731
        with torch.no_grad():
            err = (to_bhnd(fn()).float() - want).abs().max().item()
        emit(rows, name, D, N, err, fwd_bwd_timings(fn, inputs, grad_out, fwd_flops, 2.0))
        del want
        torch.cuda.empty_cache()


def print_tuned_configs() -> None:
    """The flash-attention tile sizes, warps and stages the autotuner chose, per shape key."""
    from longtrain.kernels import flash_attn
    for kernel in (flash_attn._fwd_kernel, flash_attn._bwd_dkdv_kernel, flash_attn._bwd_dq_kernel):
        for key, config in kernel.cache.items():
            print(f"{kernel.fn.__name__} {key}: {config}")


def smoke() -> None:
    """Interpreter run at a tiny size: the kernels agree with the reference (no timing meaning)."""
    from longtrain.kernels import flash_attn, linear_attn, reference
    q, k, v = (torch.randn(1, 2, 128, 32) for _ in range(3))
    out, lse = flash_attn.attention_forward(q, k, v, scale=32 ** -0.5)
    ref, ref_lse = reference.attention_forward(q, k, v, scale=32 ** -0.5)
    g = -torch.rand(1, 2, 128, 32)
    lin, _ = linear_attn.chunk_forward(q, k, v, 0.2, g, None, None)
    lin_ref, _ = reference.linear_attention_chunked(q, k, v, scale=0.2, log_decay=g)
    print(f"flash attention max err {(out - ref).abs().max():.2e}, lse {(lse - ref_lse).abs().max():.2e}; "
          f"linear attention max err {(lin - lin_ref).abs().max():.2e} (interpreter, N=128, D=32)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--smoke", action="store_true", help="CPU interpreter check at a tiny size")
    p.add_argument("--n", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--out", default="benchmarks/kernels.png")
    args = p.parse_args()
    if args.smoke or not torch.cuda.is_available():
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("no GPU: run with TRITON_INTERPRET=1 --smoke for the CPU interpreter check")
        smoke()
        return
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(table_header(COLUMNS), flush=True)
    rows = []  # linear attention first: flash attention's autotuning compiles 15 configs per shape
    linear_rows(args.n, args.d, rows, baseline=False)
    linear_rows(args.n, args.d, rows, baseline=True)
    flash_rows(args.n, args.d, rows)
    print_tuned_configs()
    plot([r for r in rows if r["mode"] == "fwd+bwd"], "N", "TFLOP/s",
         ["kernel", "D", "mode"], args.out, "attention kernels, bf16 causal")


if __name__ == "__main__":
    main()
