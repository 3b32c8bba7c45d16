"""Softmax-family SP algorithms equal the single-device op: outputs, lse and q/k/v gradients (real gloo ranks)."""
import itertools
import types

import pytest
import torch

from longtrain.parallel.spawn import run_distributed
from longtrain.attention import sigmoid_attention, softmax_attention
from longtrain.kernels import get_backend
from longtrain.parallel import SOFTMAX_SP, check_algorithm, comm, shard_sequence, sp_softmax_attention, unshard_sequence
from longtrain.parallel.sharding import num_chunks
from longtrain.parallel.ring import chunk_pairs, document_spans, ring_attention, sequence_spans

pytestmark = pytest.mark.slow


def make_inputs(B, Hq, Hkv, N, D, dtype, docs):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=dtype)
    dout = torch.randn(B, Hq, N, D, generator=g, dtype=dtype)
    dlse = torch.randn(B, Hq, N, generator=g, dtype=torch.float32)
    seg = None
    if docs:  # documents of odd lengths that cross every rank boundary
        bounds = torch.tensor([0, 5, 13, 14, 29, N])
        seg = torch.bucketize(torch.arange(N), bounds[1:-1], right=True)[None].repeat(B, 1)
    return q, k, v, dout, dlse, seg


def backward(out, lse, dout, dlse):
    """Gradients from both outputs: a caller may use the lse (merging attention results, say)."""
    torch.autograd.backward([out] + ([lse] if lse is not None else []), [dout] + ([dlse] if lse is not None else []))


def reference(q, k, v, dout, dlse, seg, kind, causal, window):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    if kind == "sigmoid":
        out, lse = sigmoid_attention(q, k, v, causal=causal, window=window, segment_ids=seg, bias=-2.0), None
    else:
        out, lse = softmax_attention(q, k, v, causal=causal, window=window, segment_ids=seg)
    backward(out, lse, dout, dlse)
    return out, lse, q.grad, k.grad, v.grad


def check_case(group, algorithm, layout, kind, causal, window, docs, Hq, Hkv, dtype, tol, ulysses_size=1, **kw):
    N = 48
    q, k, v, dout, dlse, seg = make_inputs(2, Hq, Hkv, N, 16, dtype, docs)
    ref = reference(q, k, v, dout, dlse, seg, kind, causal, window)
    shard = lambda t, dim=2: None if t is None else shard_sequence(t, dim, group, layout)
    ql, kl, vl = (shard(t).clone().requires_grad_() for t in (q, k, v))
    out, lse = sp_softmax_attention(ql, kl, vl, group=group, algorithm=algorithm, layout=layout, causal=causal,
                                    window=window, segment_ids=shard(seg, 1), kind=kind, sigmoid_bias=-2.0,
                                    ulysses_size=ulysses_size, **kw)
    backward(out, lse, shard(dout), shard(dlse))
    name = f"{algorithm}/{layout}/{kind}/causal={causal}/window={window}/docs={docs}/H={Hq}:{Hkv}/{dtype}/{kw}"
    for what, got, want in [("out", out, ref[0]), ("dq", ql.grad, ref[2]), ("dk", kl.grad, ref[3]),
                            ("dv", vl.grad, ref[4])] + ([("lse", lse, ref[1])] if kind == "softmax" else []):
        err = (got.double() - shard(want).double()).abs().max().item()
        assert err < tol, f"{name}: {what} max abs err {err}"
    full = unshard_sequence(out.detach(), 2, group, layout)  # the shards reassemble the single-device output
    assert (full.double() - ref[0].double()).abs().max().item() < tol, f"{name}: unsharded out"


def worker_all_algorithms(rank, world):
    group = torch.distributed.group.WORLD
    for algorithm, layout, kind in itertools.product(["ring", "allgather", "ulysses"], ["contiguous", "zigzag"],
                                                     ["softmax", "sigmoid"]):
        chunk = 48 // num_chunks(world, layout)  # windows whose edge falls on a chunk boundary, and a tiny one
        for causal, window, docs in [(True, None, False), (False, None, False), (True, 7, False), (True, None, True),
                                     (True, 11, True), (True, 2, False), (True, chunk + 1, False)]:
            if window is not None and not causal:
                continue
            heads = (12, 12) if algorithm == "ulysses" else (4, 2)
            check_case(group, algorithm, layout, kind, causal, window, docs, *heads,
                       torch.float64, 1e-10)
    check_case(group, "ring", "zigzag", "softmax", True, None, True, 4, 2, torch.float32, 1e-5)
    check_case(group, "allgather", "contiguous", "softmax", True, 9, False, 4, 2, torch.float32, 1e-5)
    check_case(group, "allgather", "zigzag", "softmax", True, None, True, 4, 2, torch.float64, 1e-10,
               save_gathered_kv=True)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_softmax_sp_matches_single_device(world):
    run_distributed(worker_all_algorithms, world)


def worker_p2p_nccl(rank, world):
    comm.emulate_nccl(True)  # one request per batch, as batch_isend_irecv returns on NCCL
    group = torch.distributed.group.WORLD
    for layout, (causal, window, docs) in itertools.product(["contiguous", "zigzag"], [
            (True, None, False), (False, None, False), (True, 7, False), (True, None, True)]):
        check_case(group, "ring", layout, "softmax", causal, window, docs, 4, 2, torch.float64, 1e-10)
    if world == 4:
        check_case(group, "usp", "zigzag", "softmax", True, None, True, 2, 2, torch.float64, 1e-10, ulysses_size=2)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ring_and_usp_exact_under_nccl_semantics(world):
    run_distributed(worker_p2p_nccl, world)


def worker_ring_skips_foreign_documents(rank, world):
    group = torch.distributed.group.WORLD
    N, calls = 64, []
    torch_kernels = get_backend("torch")
    counting = types.SimpleNamespace(attention_backward=torch_kernels.attention_backward)
    counting.attention_forward = lambda *a, **kw: calls.append(1) or torch_kernels.attention_forward(*a, **kw)
    q, k, v, _, _, _ = make_inputs(2, 2, 2, N, 8, torch.float64, False)
    seg = (torch.arange(N) // (N // 8))[None].repeat(2, 1)  # 8 documents: one per zigzag chunk at P=4
    seg[1, 40:] = 7  # row 1: the last three chunks are one document
    local = [shard_sequence(t, 2, group, "zigzag") for t in (q, k, v)]
    opts = dict(scale=8 ** -0.5, causal=True, window=None, kind="softmax", sigmoid_bias=0.0)
    counts = []
    for segment_ids in (None, seg):
        calls.clear()
        shard = None if segment_ids is None else shard_sequence(segment_ids, 1, group, "zigzag")
        out, _ = ring_attention(*local, shard, group, "zigzag", counting, opts)
        assert document_spans(shard, group, "zigzag") == sequence_spans(segment_ids, world, "zigzag")
        want, _ = softmax_attention(q, k, v, causal=True, segment_ids=segment_ids)
        assert (out - shard_sequence(want, 2, group, "zigzag")).abs().max() < 1e-10
        counts.append(len(calls))
    # rank r holds chunks r and 7-r; pairs sharing a document: its two diagonal pairs, plus (7, 5), (7, 6) on
    # rank 0 and (6, 5) on rank 1, inside row 1's last document
    return counts, {0: 4, 1: 3, 2: 2, 3: 2}[rank]


def test_ring_skips_chunk_pairs_without_a_shared_document():
    for (full_calls, doc_calls), shared in run_distributed(worker_ring_skips_foreign_documents, 4):
        assert doc_calls == shared < full_calls, (doc_calls, shared, full_calls)


def worker_usp(rank, world):
    group = torch.distributed.group.WORLD
    for layout in ["contiguous", "zigzag"]:
        check_case(group, "usp", layout, "softmax", True, None, True, 2, 2, torch.float64, 1e-10, ulysses_size=2)
        check_case(group, "usp", layout, "softmax", True, 7, False, 2, 2, torch.float64, 1e-10, ulysses_size=2)
    try:
        check_case(group, "usp", "contiguous", "softmax", True, None, False, 3, 3, torch.float64, 1e-10,
                   ulysses_size=2)
    except ValueError as e:
        assert "ulysses_size in" in str(e), e
    else:
        raise AssertionError("usp with heads not divisible by U must fail")


def test_usp_four_ranks_two_groups():
    run_distributed(worker_usp, 4)


def worker_usp_three_groups(rank, world):
    check_case(torch.distributed.group.WORLD, "usp", "zigzag", "softmax", True, None, True, 2, 2, torch.float64, 1e-10,
               ulysses_size=2)


def test_usp_six_ranks_three_ulysses_groups_of_two():
    """P=6, U=2: Ulysses inside {0,1}, {2,3}, {4,5}, the ring across groups of 3 (at P=4 U=2 and P/U coincide)."""
    run_distributed(worker_usp_three_groups, 6)


def worker_ring_bytes(rank, world):
    B, Hkv, N, D = 2, 2, 64, 8
    q, k, v, dout, _, _ = make_inputs(B, 4, Hkv, N, D, torch.float32, False)
    group = torch.distributed.group.WORLD
    comm.reset_counters()
    sp_softmax_attention(shard_sequence(q, 2, group), shard_sequence(k, 2, group), shard_sequence(v, 2, group),
                         group=group, algorithm="ring")
    expected = (world - 1) * 2 * B * Hkv * (N // world) * D * 4
    assert comm.BYTES_SENT["ring_fwd"] == expected, (comm.BYTES_SENT["ring_fwd"], expected)
    return comm.BYTES_SENT["ring_fwd"]


@pytest.mark.parametrize("world", [2, 4])
def test_ring_forward_bytes_match_formula(world):
    run_distributed(worker_ring_bytes, world)


def worker_bad_input(rank, world):
    group = torch.distributed.group.WORLD
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="N=10"):
        shard_sequence(q, 2, group, "zigzag")
    with pytest.raises(ValueError, match="N=12 is not divisible by 8"):  # P divides 12, but zigzag cuts 2P chunks
        shard_sequence(torch.randn(1, 2, 12, 4), 2, group, "zigzag")
    with pytest.raises(ValueError, match="unknown SP algorithm 'rng'"):
        sp_softmax_attention(q, q, q, group=group, algorithm="rng")
    with pytest.raises(ValueError, match="divisible"):
        sp_softmax_attention(q[:, :, :5], q[:, :1, :5], q[:, :1, :5], group=group, algorithm="ulysses")


def test_bad_input_is_a_clear_error():
    run_distributed(worker_bad_input, 4)


def test_algorithm_none_needs_an_sp_group_of_one():
    for P in (2, 3):
        with pytest.raises(ValueError, match=f"algorithm 'none' needs an SP group of size 1, got {P}"):
            check_algorithm("none", SOFTMAX_SP, P)
    check_algorithm("none", SOFTMAX_SP, 1)


def worker_raises_on_one_rank(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 broke")
    torch.distributed.barrier()


def test_one_failing_rank_fails_fast():
    with pytest.raises(RuntimeError, match="rank 1 broke"):
        run_distributed(worker_raises_on_one_rank, 2, timeout=30)


def worker_allgather_ulysses_bytes(rank, world):
    B, H, N, D = 2, 4, 64, 8
    q, k, v, dout, _, _ = make_inputs(B, H, H, N, D, torch.float32, False)
    group = torch.distributed.group.WORLD
    shard_bytes = B * H * (N // world) * D * 4
    lse_bytes = B * H * (N // world) * 4
    # all-gather: K and V shards to P-1 ranks, again in backward (or not with save_gathered_kv), reduce-scatter of
    # dK, dV back. Ulysses: (P-1)/P of q, k, v, out and lse forward; of dout, dq, dk, dv backward.
    for algorithm, save, expected_fwd, expected_bwd in [
            ("allgather", False, 2 * (world - 1) * shard_bytes, 4 * (world - 1) * shard_bytes),
            ("allgather", True, 2 * (world - 1) * shard_bytes, 2 * (world - 1) * shard_bytes),
            ("ulysses", False, (world - 1) * (4 * shard_bytes + lse_bytes) // world,
             4 * (world - 1) * shard_bytes // world)]:
        comm.reset_counters()
        local = [shard_sequence(t, 2, group).requires_grad_() for t in (q, k, v)]
        out, _ = sp_softmax_attention(*local, group=group, algorithm=algorithm, save_gathered_kv=save)
        out.backward(shard_sequence(dout, 2, group))
        assert comm.BYTES_SENT[f"{algorithm}_fwd"] == expected_fwd, (algorithm, comm.BYTES_SENT)
        assert comm.BYTES_SENT[f"{algorithm}_bwd"] == expected_bwd, (algorithm, comm.BYTES_SENT)
    comm.reset_counters()  # the mixers' call: no lse wanted, so Ulysses does not send it back
    out, lse = sp_softmax_attention(*(shard_sequence(t, 2, group) for t in (q, k, v)), group=group,
                                    algorithm="ulysses", return_lse=False)
    assert lse is None and comm.BYTES_SENT["ulysses_fwd"] == 4 * (world - 1) * shard_bytes // world


def test_allgather_and_ulysses_bytes_match_formulas():
    run_distributed(worker_allgather_ulysses_bytes, 4)


def ring_causal_work(P: int, layout: str, rank: int, n_local: int = 16) -> int:
    """Unmasked (query, key) pairs that `rank` computes over all ring steps of causal attention."""
    work = 0
    for src in range(P):
        for qc, kc in chunk_pairs(n_local, P, rank, src, layout, True, None):
            q_pos, k_pos = torch.arange(qc[1], qc[1] + qc[2]), torch.arange(kc[1], kc[1] + kc[2])
            work += int((q_pos[:, None] >= k_pos[None]).sum())
    return work


def test_zigzag_balances_the_softmax_layers_of_a_zeco_hybrid():
    # ZeCO and LASP-1 take the zigzag layout (tests/test_sp_linear.py), so a hybrid's ring layers can use it
    for layout, max_over_mean in [("contiguous", 904 / 520), ("zigzag", 1.0)]:
        work = [ring_causal_work(4, layout, r) for r in range(4)]
        assert max(work) / (sum(work) / 4) == pytest.approx(max_over_mean, rel=1e-9), (layout, work)
