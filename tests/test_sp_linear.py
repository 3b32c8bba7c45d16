"""Linear-family SP algorithms (LASP-1, LASP-2, ZeCO, Ulysses) equal single-device linear_attention, on gloo and
under NCCL's request semantics (comm.emulate_nccl), in both layouts."""
import pytest
import torch

from longtrain.parallel.spawn import run_distributed
from longtrain.attention import linear_attention
from longtrain.parallel import comm, shard_sequence, sp_linear_attention

pytestmark = pytest.mark.slow
ALGORITHMS = ["lasp1", "lasp2", "zeco", "ulysses"]


def make_inputs(N, decay, docs, dtype, B=3, H=4, D=8):
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(B, H, N, D, generator=g, dtype=dtype) for _ in range(4))
    log_decay = None
    if decay == "scalar":
        log_decay = -torch.rand(B, H, N, generator=g, dtype=dtype)
    elif decay == "channel":
        log_decay = -torch.rand(B, H, N, D, generator=g, dtype=dtype) * 2
    seg = None
    if docs:
        bounds = torch.tensor([3, 17, 18, 40])
        seg = torch.bucketize(torch.arange(N), bounds, right=True)[None].repeat(B, 1)
        seg[1] = 0  # one row is a single document
        seg[2] = torch.bucketize(torch.arange(N), torch.tensor([8, 12, 16, 24, 32, 36]), right=True)  # documents
        # that start on chunk boundaries: a rank's first token opens a document (P = 2, 3, 4, both layouts)
    return q, k, v, log_decay, dout, seg


def check_case(group, algorithm, decay, docs, dtype, tol, blocks=None, N=48, layout="contiguous"):
    q, k, v, log_decay, dout, seg = make_inputs(N, decay, docs, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + \
        ([log_decay.clone().requires_grad_()] if log_decay is not None else [])
    ref, _ = linear_attention(*leaves[:3], log_decay=leaves[3] if log_decay is not None else None,
                              segment_ids=seg, chunk_size=8)
    ref.backward(dout)
    shard = lambda t, dim=2: None if t is None else shard_sequence(t, dim, group, layout)
    local = [shard(t).clone().requires_grad_() for t in (q, k, v)] + \
        ([shard(log_decay).clone().requires_grad_()] if log_decay is not None else [])
    out = sp_linear_attention(*local[:3], group=group, algorithm=algorithm,
                              log_decay=local[3] if log_decay is not None else None, segment_ids=shard(seg, 1),
                              zeco_blocks=blocks, chunk_size=8, layout=layout)
    out.backward(shard(dout))
    name = f"{algorithm}/{layout}/decay={decay}/docs={docs}/K={blocks}/{dtype}"
    pairs = [("out", out, shard(ref))] + [(f"d{n}", a.grad, shard(b.grad)) for n, a, b in zip("qkvg", local, leaves)]
    for what, got, want in pairs:
        err = (got.double() - want.double()).abs().max().item()
        assert err < tol, f"{name}: {what} max abs err {err}"


def worker_exact(rank, world, mode):
    comm.emulate_nccl(mode == "nccl")
    group = torch.distributed.group.WORLD
    if mode == "nccl":  # the point-to-point algorithms; the others only call collectives
        algorithms = ["lasp1", "zeco"]
    else:
        algorithms = ALGORITHMS if 4 % world == 0 else ["lasp1", "lasp2", "zeco"]  # ulysses: heads divisible by P
    for algorithm in algorithms:
        for decay in [None, "scalar", "channel"]:
            for docs in [False, True]:
                check_case(group, algorithm, decay, docs, torch.float64, 1e-10)
    for blocks in [1, 2, 3, 4]:
        check_case(group, "zeco", "channel", True, torch.float64, 1e-10, blocks=blocks)
    for algorithm in algorithms:
        check_case(group, algorithm, "channel", True, torch.float32, 1e-5)
    for algorithm in algorithms:  # zigzag: hybrids keep their ring attention balanced
        for decay in [None, "scalar", "channel"]:
            check_case(group, algorithm, decay, True, torch.float64, 1e-10, layout="zigzag")
    check_case(group, "zeco", "channel", False, torch.float64, 1e-10, layout="zigzag", blocks=3)


@pytest.mark.parametrize("mode", ["gloo", "nccl"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_linear_sp_matches_single_device(world, mode):
    run_distributed(worker_exact, world, mode)


def worker_bytes(rank, world):
    group = torch.distributed.group.WORLD
    sent = {}
    for N in (32, 64):
        q, k, v, log_decay, _, _ = make_inputs(N, "channel", False, torch.float32)
        for algorithm in ["lasp1", "lasp2", "zeco"]:
            comm.reset_counters()
            sp_linear_attention(*(shard_sequence(t, 2, group) for t in (q, k, v)), group=group, algorithm=algorithm,
                                log_decay=shard_sequence(log_decay, 2, group))
            sent[(algorithm, N)] = comm.BYTES_SENT[f"{algorithm}_fwd"]
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    state = B * H * D * D * 4
    decay = B * H * D * 4
    last = rank == world - 1
    assert sent[("lasp1", 32)] == sent[("lasp1", 64)] == (0 if last else state)
    assert sent[("zeco", 32)] == sent[("zeco", 64)] == (0 if last else state)
    assert sent[("lasp2", 32)] == sent[("lasp2", 64)] == (world - 1) * (state + decay)


@pytest.mark.parametrize("world", [2, 4])
def test_linear_sp_bytes_match_formulas_and_do_not_grow_with_n(world):
    run_distributed(worker_bytes, world)
