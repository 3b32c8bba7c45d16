"""The cost model against hand-computed cases and against the bytes gloo runs count; the planner and calibration."""
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from longtrain.config import load_config
from longtrain.parallel import (comm, document_gates, sequence_spans, shard_sequence, sp_linear_attention,
                                sp_softmax_attention)
from longtrain.parallel.spawn import run_distributed
from longtrain.plan.calibrate import collective_links, fit
from longtrain.plan.cost import (Mask, OpShape, StepCost, linear_op_cost, ring_steps_with_work, scan_time,
                                 softmax_op_cost, step_cost)
from longtrain.plan.hardware import Hardware, Link, from_dict, load_profile, to_dict
from longtrain.plan.planner import Plan, parse_tokens, search, shortfall, splits, write_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("p2p", "all_gather", "reduce_scatter", "all_to_all")


def slow_link_hardware(latency: float = 1.0, bandwidth: float = 64.0, flops: float = 1e30, gpus_per_node: int = 8,
                       memory: float = 2 ** 40) -> Hardware:
    """Compute for free and every message alpha + bytes / beta: times are the communication alone."""
    link = {k: Link(latency, bandwidth) for k in KINDS}
    return Hardware("test", gpus_per_node, memory, flops, flops, {1: flops}, {1: flops}, flops, flops, link,
                    {k: Link(10 * latency, bandwidth / 10) for k in KINDS})


def isolated_hardware(matmul: float = 1e30, attention: float = 1e30, memory_bandwidth: float = 1e30,
                      latency: float = 0.0, bandwidth: float = 1e30) -> Hardware:
    """Everything free (1e30 FLOP/s or bytes/s, no latency) but the figures given: one term of the model at a time."""
    link = {k: Link(latency, bandwidth) for k in KINDS}
    return Hardware("test", 8, 2 ** 40, 1e30, matmul, {1: attention}, {1: attention}, 1e30, memory_bandwidth, link,
                    dict(link))


def test_mask_pairs_by_hand():
    assert Mask().pairs(4) == 10  # 1 + 2 + 3 + 4
    assert Mask("window", window=2).pairs(5) == 9  # 1 + 2 + 2 + 2 + 2
    assert Mask("documents", doc_lengths=[2, 3]).pairs(5) == 3 + 6


def test_parse_tokens():
    assert parse_tokens("1M") == 2 ** 20 and parse_tokens("32k") == 32768 and parse_tokens("4096") == 4096
    with pytest.raises(ValueError, match="'1Q'"):
        parse_tokens("1Q")


def test_ring_times_and_bytes_by_hand():
    hw = slow_link_hardware()
    shape = OpShape(batch=1, seq=8, heads=1, kv_heads=1, head_dim=2, elem=4)
    cost = softmax_op_cost("ring", shape, 2, hw, Mask(), "zigzag")
    kv_shard = 2 * 4 * 2 * 4  # K and V of 4 local tokens, D=2, fp32: 64 bytes, one hop of 1 + 64/64 s
    assert cost.fwd_bytes == kv_shard and cost.fwd_s == pytest.approx(2.0)
    assert cost.bwd_bytes == kv_shard + 2 * kv_shard  # K/V once more, dK/dV (fp32) twice: to the peer and home
    assert cost.bwd_s == pytest.approx((2.0 + 2.0) + 2.0)  # the step's K/V and dK/dV hops, then the last dK/dV


def test_allgather_and_ulysses_bytes_by_hand():
    hw = slow_link_hardware()
    shape = OpShape(batch=2, seq=16, heads=4, kv_heads=2, head_dim=8, elem=2)
    P, n = 4, 4
    ag = softmax_op_cost("allgather", shape, P, hw)
    assert ag.fwd_bytes == (P - 1) * 2 * 2 * 2 * n * 8 * 2
    assert ag.bwd_bytes == ag.fwd_bytes + (P - 1) * 2 * 2 * 2 * n * 8 * 4  # re-gather + fp32 reduce-scatter
    uly = softmax_op_cost("ulysses", shape, P, hw)
    assert uly.fwd_bytes == pytest.approx((P - 1) / P * 2 * n * 8 * (4 + 2 + 2 + 4) * 2)


def test_scan_pipelines_blocks():
    hw = slow_link_hardware(latency=0.5, bandwidth=1.0)
    shape = OpShape(batch=1, seq=64, heads=1, kv_heads=1, head_dim=2, elem=4)  # state 2 x 2 fp32: 16 bytes
    lasp1 = linear_op_cost("lasp1", shape, 4, hw, "contiguous")
    zeco = linear_op_cost("zeco", shape, 4, hw, "contiguous", zeco_blocks=2)
    assert lasp1.fwd_comm_s == pytest.approx(3 * (0.5 + 16))  # three serial hops of the whole state
    assert zeco.fwd_comm_s == pytest.approx((3 + 1) * (0.5 + 8))  # (hops + K - 1) half-state hops
    assert scan_time([Link(0, 1), Link(0, 4)], 8, 2) == pytest.approx(4 + 1 + 4)  # the slowest hop paces the rest
    zig = linear_op_cost("lasp1", shape, 4, hw, "zigzag")
    assert zig.fwd_bytes == 2 * lasp1.fwd_bytes  # 0..P-1 and back: 2(P-1) hops


def test_step_overhead_counts_each_algorithms_steps():
    """The profile's fixed time per step adds steps x (forward, backward): ring P, usp P/U, a chain its hops."""
    shape = OpShape(batch=1, seq=64, heads=4, kv_heads=4, head_dim=2)
    plain, hw = slow_link_hardware(), slow_link_hardware()
    hw.step_overhead = {alg: (1.0, 3.0) for alg in ("ring", "allgather", "ulysses", "usp", "lasp1", "lasp2", "zeco")}
    for alg, steps in (("ring", 4), ("allgather", 1), ("ulysses", 1), ("usp", 2)):
        base, more = (softmax_op_cost(alg, shape, 4, h, Mask(), "zigzag", ulysses=2) for h in (plain, hw))
        assert (more.fwd_s - base.fwd_s, more.bwd_s - base.bwd_s) == pytest.approx((steps, 3 * steps)), alg
    for alg, layout, steps in (("lasp1", "zigzag", 6), ("zeco", "contiguous", 3), ("lasp2", "zigzag", 1)):
        base, more = (linear_op_cost(alg, shape, 4, h, layout, zeco_blocks=2) for h in (plain, hw))
        assert (more.fwd_s - base.fwd_s, more.bwd_s - base.bwd_s) == pytest.approx((steps, 3 * steps)), alg
    assert linear_op_cost("lasp1", shape, 1, hw).fwd_s == linear_op_cost("lasp1", shape, 1, plain).fwd_s
    window = Mask("window", window=4)  # P=8: 16 zigzag chunks of 4 tokens, each sees itself and the one before:
    base, more = (softmax_op_cost("ring", shape, 8, h, window, "zigzag") for h in (plain, hw))
    assert more.fwd_s - base.fwd_s == pytest.approx(3)  # rank r works with r-1, r, r+1: 3 of 8 steps pay overhead
    hw.step_overhead["linear_ulysses"] = (5.0, 7.0)  # linear Ulysses has its own entry, not softmax Ulysses'
    base, more = (linear_op_cost("ulysses", shape, 4, h) for h in (plain, hw))
    assert (more.fwd_s - base.fwd_s, more.bwd_s - base.bwd_s) == pytest.approx((5.0, 7.0))
    assert from_dict(to_dict(hw)).step_overhead["zeco"] == pytest.approx((1.0, 3.0))


def test_ring_steps_with_work_follow_the_rings_own_pairs():
    """Steps with attention work on the busiest rank, against ring.chunk_pairs on real packed ids and windows:
    one chunk per document leaves each rank only its own step; a long document reaches across ranks."""
    from longtrain.parallel.ring import chunk_pairs
    N = 64
    for P, layout, window in [(8, "zigzag", 4), (8, "zigzag", 5), (8, "contiguous", 9), (4, "zigzag", 1),
                              (4, "contiguous", 64), (2, "zigzag", 16)]:
        want = max(sum(bool(chunk_pairs(N // P, P, r, (r - s) % P, layout, True, window)) for s in range(P))
                   for r in range(P))
        assert ring_steps_with_work(Mask("window", window=window), P, layout, N) == want, (P, layout, window)
    for P, layout, lengths in [(4, "zigzag", [8] * 8), (4, "contiguous", [16] * 4), (4, "zigzag", [32] + [2] * 16),
                               (2, "zigzag", [5, 40, 19]), (4, "contiguous", [3, 29, 32])]:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
        spans = sequence_spans(ids, P, layout)
        want = max(sum(bool(chunk_pairs(N // P, P, r, (r - s) % P, layout, True, None, spans)) for s in range(P))
                   for r in range(P))
        got = ring_steps_with_work(Mask("documents", doc_lengths=lengths), P, layout, N)
        assert got == want, (P, layout, lengths)
    assert ring_steps_with_work(Mask("documents", doc_lengths=[8] * 8), 4, "zigzag", 64) == 1


def test_linear_backward_overlap_by_hand():
    """LASP-2's backward: after a fused local backward the all-gather is exposed whole; beside the torch path's
    split backward it hides behind the output part, and the state's share (2 Dk Dv / (2 C Dk + 2 C Dv + 4 Dk Dv)
    = 1/4 at C = Dk = Dv = 2) is paid twice."""
    shape = OpShape(batch=1, seq=64, heads=1, kv_heads=1, head_dim=2, chunk=2, elem=4)
    hw = slow_link_hardware(latency=1.0, bandwidth=1e30, flops=512)  # 16 tokens x 32 FLOPs: forward 1 s, backward 2 s
    fused = linear_op_cost("lasp2", shape, 4, hw, "contiguous")
    assert fused.bwd_compute_s == pytest.approx(2.0) and fused.bwd_comm_s == pytest.approx(3.0)
    assert fused.bwd_s == pytest.approx(2.0 + 3.0)
    hw.fused_linear_backward = False
    split = linear_op_cost("lasp2", shape, 4, hw, "contiguous")
    assert split.bwd_s == pytest.approx(2.0 * 1.25 + (3.0 - 2.0 * 0.75))
    assert from_dict(to_dict(hw)).fused_linear_backward is False


def test_chain_crosses_nodes_only_at_boundaries():
    hw = slow_link_hardware(latency=1.0, bandwidth=1e30, gpus_per_node=2)  # inter-node latency 10
    shape = OpShape(batch=1, seq=64, heads=1, kv_heads=1, head_dim=2)
    assert linear_op_cost("lasp1", shape, 4, hw, "contiguous").fwd_comm_s == pytest.approx(1 + 10 + 1)


def test_attention_speed_interpolates_in_log_length():
    """Between two measured block lengths the FLOP/s move linearly in log N: at 2048 of {1024: 100, 8192: 400},
    one third of the way (log 2 of log 8), 200; outside the table the nearest figure."""
    hw = isolated_hardware()
    hw.attention_fwd = {1024: 100.0, 8192: 400.0}
    assert hw.attention_flops(2048, False) == pytest.approx(100 + (400 - 100) / 3)
    assert hw.attention_flops(4096, False) == pytest.approx(100 + (400 - 100) * 2 / 3)
    assert hw.attention_flops(512, False) == 100.0 and hw.attention_flops(16384, False) == 400.0


def test_causal_ring_costs_the_busiest_rank():
    """Causal FLOPs 4 D H B N(N+1)/2 over P ranks: zigzag balances them, the contiguous layout waits for the last
    rank's (2P-1)/P times the mean. N=64, D=2, P=4: 2080 pairs, 520 a rank, 4 x 2 FLOPs each at 1000 FLOP/s."""
    hw = isolated_hardware(attention=1e3)
    shape = OpShape(batch=1, seq=64, heads=1, kv_heads=1, head_dim=2)
    mean = 4 * 2 * (64 * 65 / 2) / 4 / 1e3  # 4.16 s
    for layout, busiest in (("zigzag", mean), ("contiguous", mean * 7 / 4)):
        cost = softmax_op_cost("ring", shape, 4, hw, Mask(), layout)
        assert cost.fwd_compute_s == pytest.approx(busiest), layout
        assert cost.bwd_compute_s == pytest.approx(2.5 * busiest), layout
        assert cost.fwd_s == pytest.approx(busiest), layout  # free links: the steps' shares add up to the whole


def test_packed_documents_run_at_the_document_block_speed():
    """Packed documents shorter than a rank's shard run the kernel at the document length, not the shard's:
    8 documents of 8 tokens, 8 x 36 pairs, over P=2 ranks (32 tokens each) are 4 x 2 x 144 = 1152 FLOPs a rank,
    at the 8-token speed."""
    hw = isolated_hardware()
    hw.attention_fwd, hw.attention_bwd = {8: 1152.0, 32: 11520.0}, {8: 2880.0, 32: 28800.0}
    shape = OpShape(batch=1, seq=64, heads=1, kv_heads=1, head_dim=2)
    cost = softmax_op_cost("ring", shape, 2, hw, Mask("documents", doc_lengths=[8] * 8), "zigzag")
    assert cost.fwd_compute_s == pytest.approx(1.0)  # 1152 FLOPs at 1152 FLOP/s (the 32-token speed is 10x)
    assert cost.bwd_compute_s == pytest.approx(2.5 * 1152 / 2880)


def test_ring_merges_each_received_partial():
    """The ring merges P-1 received partials (not the first, local one), each 4 passes over B n H (D+1) fp32:
    B=1, n=2, H=1, D=2: 96 bytes, 1 s at 96 bytes/s; compute and links free."""
    hw = isolated_hardware(memory_bandwidth=96.0)
    shape = OpShape(batch=1, seq=8, heads=1, kv_heads=1, head_dim=2)
    cost = softmax_op_cost("ring", shape, 4, hw, Mask(), "zigzag")
    assert cost.fwd_s == pytest.approx(3.0) and cost.bwd_s == pytest.approx(0.0)


def test_allgather_backward_gathers_again_and_scatters_dk_dv_apart():
    """All-gather's backward: K/V gathered again ((P-1) hops) and dK, dV reduce-scattered as two collectives
    (2 (P-1) hops of half the shard in fp32). Latency alone: (P-1) + 2 (P-1) messages; bandwidth alone:
    (P-1) x the shard at e + 4 bytes an element."""
    shape = OpShape(batch=1, seq=16, heads=2, kv_heads=2, head_dim=4, elem=2)
    P, shard = 4, 2 * 1 * 2 * 4 * 4  # K and V of n=4 tokens, 2 heads of 4: elements
    latency = softmax_op_cost("allgather", shape, P, isolated_hardware(latency=1.0))
    assert latency.fwd_s == pytest.approx(P - 1) and latency.bwd_s == pytest.approx(3 * (P - 1))
    bandwidth = softmax_op_cost("allgather", shape, P, isolated_hardware(bandwidth=1.0))
    assert bandwidth.fwd_s == pytest.approx((P - 1) * shard * 2)
    assert bandwidth.bwd_s == pytest.approx((P - 1) * shard * (2 + 4))


def test_profiles_load_and_round_trip():
    for name in ("h100-nvlink-ib", "a100-nvlink-ib"):
        hw = load_profile(name)
        assert hw.gpus_per_node == 8 and hw.intra["all_gather"].bandwidth > hw.inter["all_gather"].bandwidth
        again = from_dict(to_dict(hw))
        assert again.intra["p2p"].latency == pytest.approx(hw.intra["p2p"].latency)
        assert again.attention_flops(8192, True) == pytest.approx(hw.attention_flops(8192, True), rel=1e-3)
    with pytest.raises(ValueError, match="'nope'"):
        load_profile("nope")
    raw = to_dict(load_profile("h100-nvlink-ib"))
    del raw["linear_tflops"]
    with pytest.raises(ValueError, match="linear_tflops"):
        from_dict(raw)


def test_fit_recovers_latency_and_bandwidth():
    link = fit([(x, 3e-6 + x / 2e9) for x in (1e3, 1e5, 1e6, 1e7)])
    assert link.latency == pytest.approx(3e-6) and link.bandwidth == pytest.approx(2e9)
    noisy = fit([(x, (3e-6 + x / 2e9) * e) for x, e in ((1e3, 1.0), (1e4, 1.0), (1e6, 1.1), (1e7, 0.9))])
    assert noisy.latency == pytest.approx(3e-6, rel=0.2)  # 10% noise on the large messages leaves alpha alone


def emulated_link_fit(rank, world, latency, bandwidth):
    """calibrate's per-hop fit of each collective over a link that comm.set_link emulates."""
    comm.set_link(latency, bandwidth)
    return {kind: (link.latency, link.bandwidth) for kind, link in collective_links(torch.device("cpu")).items()}


@pytest.mark.slow
def test_calibrate_recovers_an_emulated_link():
    """A ring collective over P ranks takes P-1 hops of latency + shard / bandwidth: the fit per hop gives back
    the emulated link (10 ms, 100 MB/s; a few seconds), whatever the sleeps on a busy machine add."""
    fitted = run_distributed(emulated_link_fit, 2, 10e-3, 1e8)[0]
    for kind in KINDS:
        latency, bandwidth = fitted[kind]
        assert latency == pytest.approx(10e-3, rel=0.3), kind
        assert bandwidth == pytest.approx(1e8, rel=0.3), kind


def measured_bytes(rank, world):
    """Mean bytes sent per rank, forward and backward, for each algorithm: counted by parallel/comm.py."""
    torch.manual_seed(0)
    B, H, N, D = 1, 4, 32, 8
    group = dist.group.WORLD
    out = {}
    cases = [("softmax", a, layout, 2 if a == "usp" else 1, docs) for a in ("ring", "allgather", "ulysses", "usp")
             for layout in ("contiguous", "zigzag") for docs in (False, True)]
    cases += [("linear", a, layout, 1, docs) for a in ("lasp1", "lasp2", "zeco", "ulysses")
              for layout in ("contiguous", "zigzag") for docs in (False, True)]
    for family, algorithm, layout, U, docs in cases:
        q, k, v, dout = (torch.randn(B, H, N, D) for _ in range(4))
        g = -torch.rand(B, H, N, D)
        seg = torch.repeat_interleave(torch.arange(4), N // 4)[None] if docs else None
        local = [shard_sequence(t, 2, group, layout).requires_grad_() for t in (q, k, v, g)]
        seg_local = None if seg is None else shard_sequence(seg, 1, group, layout)
        comm.reset_counters()
        if family == "softmax":
            spans = sequence_spans(seg, world, layout) if algorithm == "ring" else None
            o, _ = sp_softmax_attention(*local[:3], group=group, algorithm=algorithm, layout=layout,
                                        segment_ids=seg_local, ulysses_size=U, doc_spans=spans, return_lse=False)
        else:
            gates = document_gates(seg_local, group, layout)  # once per step in training: not the op's bytes
            comm.reset_counters()
            o = sp_linear_attention(*local[:3], group=group, algorithm=algorithm, log_decay=local[3], layout=layout,
                                    segment_ids=seg_local, doc_gates=gates, zeco_blocks=2)
        fwd = sum(comm.BYTES_SENT.values())
        o.backward(shard_sequence(dout, 2, group, layout))
        bwd = sum(comm.BYTES_SENT.values()) - fwd
        totals = torch.tensor([fwd, bwd], dtype=torch.float64)
        dist.all_reduce(totals)
        out[(family, algorithm, layout, U, docs)] = (totals / world).tolist()
    return out


@pytest.mark.slow
def test_predicted_bytes_equal_counted_bytes():
    """Every algorithm's predicted bytes per rank equal what the comm accounting counts in a real gloo run."""
    P = 4
    measured = run_distributed(measured_bytes, P)[0]
    hw = load_profile("h100-nvlink-ib")
    for (family, algorithm, layout, U, docs), (fwd, bwd) in measured.items():
        shape = OpShape(batch=1, seq=32, heads=4, kv_heads=4, head_dim=8, elem=4)
        mask = Mask("documents", doc_lengths=[8] * 4) if docs else Mask()
        if family == "softmax":
            cost = softmax_op_cost(algorithm, shape, P, hw, mask, layout, U)
        else:
            cost = linear_op_cost(algorithm, shape, P, hw, layout, zeco_blocks=2, mask=mask)
        case = f"{family} {algorithm} {layout} U={U} documents={docs}"
        assert cost.fwd_bytes == pytest.approx(fwd), case
        assert cost.bwd_bytes == pytest.approx(bwd), case


def test_step_cost_counts_recompute_and_accumulation():
    hw = load_profile("h100-nvlink-ib")
    base = ["parallel.sp_size=4", "data.seq_len=4096", "model.d_model=256", "model.n_layers=4"]
    plain = step_cost(load_config(None, base), hw, 8)
    ckpt = step_cost(load_config(None, base + ["model.activation_checkpointing=true"]), hw, 8)
    accum = step_cost(load_config(None, base + ["train.grad_accum=2"]), hw, 8)
    assert ckpt.breakdown["recompute"] == pytest.approx(plain.breakdown["forward"])
    assert ckpt.memory["activations"] < plain.memory["activations"]
    assert accum.step_s == pytest.approx(2 * plain.step_s - plain.breakdown["optimizer"], rel=1e-6)
    assert accum.tokens_per_s == pytest.approx(plain.tokens_per_s, rel=0.01)


STEP_MODEL = ["model.pattern=softmax", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.mlp_hidden=64",
              "model.vocab_size=257", "data.seq_len=256", "data.batch_size=1"]
D_MODEL, HIDDEN, LAYERS, VOCAB, SEQ = 64, 64, 2, 257, 256
MIXER_WEIGHTS = 4 * D_MODEL * D_MODEL  # wq, wkv (as many K/V heads as heads), wo
LAYER_WEIGHTS = MIXER_WEIGHTS + 3 * D_MODEL * HIDDEN  # and SwiGLU's gate, up and down
PARAMS = VOCAB * D_MODEL + LAYERS * (LAYER_WEIGHTS + 2 * D_MODEL) + D_MODEL  # tied embedding, two norms a layer, last


def step_config(*overrides):
    """A 2-layer softmax model (d 64, 4 heads, MLP 64, vocab 257): one sequence of 256 tokens per micro-batch."""
    return load_config(None, STEP_MODEL + list(overrides))


def test_mixer_checkpointing_recomputes_only_the_mixer_gemms():
    """Recompute per layer: the mixer's forward GEMMs 2 x 4 d^2 x tokens (mixer mode) or the block's
    2 (4 d^2 + 3 d h) x tokens (block mode), at a GEMM speed that makes the mixer's 1 s."""
    hw = isolated_hardware(matmul=2 * MIXER_WEIGHTS * SEQ)
    for mode, per_layer in (("mixer", 1.0), ("block", LAYER_WEIGHTS / MIXER_WEIGHTS)):
        cost = step_cost(step_config("model.activation_checkpointing=true", f"model.checkpoint_mode={mode}"), hw, 1)
        assert cost.breakdown["recompute"] == pytest.approx(LAYERS * per_layer), mode
        assert cost.breakdown["forward"] == pytest.approx(LAYERS * LAYER_WEIGHTS / MIXER_WEIGHTS), mode


def test_recompute_repeats_the_forward_sp_communication():
    """Block checkpointing runs each layer's ring forward again: its P-1 hops of 1 s and, in the step's bytes,
    its (P-1) x 2 B Hkv n D e bytes of K/V once more (P=2: 2 x 4 heads x 128 tokens x 16 x 2 bytes a layer)."""
    hw = isolated_hardware(latency=1.0)
    base = ["parallel.sp_size=2", "parallel.layout=contiguous"]
    plain = step_cost(step_config(*base), hw, 2)
    ckpt = step_cost(step_config(*base, "model.activation_checkpointing=true"), hw, 2)
    assert ckpt.breakdown["recompute"] == pytest.approx(LAYERS * 1.0)
    assert ckpt.comm_bytes - plain.comm_bytes == LAYERS * (2 - 1) * 2 * 1 * 4 * 128 * 16 * 2


def test_data_parallel_traffic_hides_behind_every_micro_batch():
    """FSDP on 2 ranks, 2 micro-batches: 2 x 2 parameter all-gathers and 1 gradient reduce-scatter of one hop
    (0.5 s each: 2.5 s) beside 2 micro-batches of 1 s compute (6 x weights x tokens FLOPs, head included):
    0.5 s exposed, a 2.5 s step."""
    hw = isolated_hardware(matmul=6 * (LAYERS * LAYER_WEIGHTS + D_MODEL * VOCAB) * SEQ, latency=0.5)
    cost = step_cost(step_config("train.grad_accum=2"), hw, 2)
    assert cost.breakdown["data_parallel_exposed"] == pytest.approx(0.5)
    assert cost.step_s == pytest.approx(2.0 + 0.5)


def test_fsdp_bytes_gather_parameters_every_micro_batch():
    """FSDP sends (world-1) x shard x (2 bf16 gathers x 2 bytes x accum + 4 fp32 gradient bytes), shard = params
    / world: 2 ranks, 2 micro-batches, no SP: 12 bytes per parameter shard element."""
    cost = step_cost(step_config("train.grad_accum=2"), isolated_hardware(), 2)
    assert cost.comm_bytes == pytest.approx((2 - 1) * PARAMS / 2 * (2 * 2 * 2 + 4))


def test_tokens_per_step_count_data_parallel_replicas():
    """A step trains world / P replicas x B sequences x N tokens x accum micro-batches: 4 GPUs at SP 2,
    2 micro-batches of one 256-token sequence: 1024 tokens."""
    cost = step_cost(step_config("parallel.sp_size=2", "train.grad_accum=2"), isolated_hardware(matmul=1e9), 4)
    assert cost.tokens_per_s * cost.step_s == pytest.approx(4 // 2 * 1 * 256 * 2)


def test_planner_respects_the_memory_limit_and_says_what_runs_out():
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    roomy = search(cfg, load_profile("h100-nvlink-ib"), 4, 2048, 2)
    fitting = [p for p in roomy if p.fits]
    assert fitting and all(p.cost.memory["total"] <= p.limit for p in fitting)
    assert [p.cost.step_s for p in fitting] == sorted(p.cost.step_s for p in fitting)
    smallest = min(p.cost.memory["total"] for p in roomy)
    tight = search(cfg, slow_link_hardware(memory=smallest * 0.5), 4, 2048, 2)
    assert not any(p.fits for p in tight)
    message = shortfall(tight)
    assert "memory runs out first" in message and f"{smallest / 2 ** 30:.1f} GB" in message


def test_splits_divide_the_global_batch_among_dp_replicas():
    """2 sequences on 4 GPUs: dp 2 x sp 2 (one sequence a replica) or dp 1 x sp 4 (both); dp 4 cannot split 2."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    got = {(split["parallel.sp_size"], per_rank) for split, per_rank in splits(cfg, 4, 2048, 2)}
    assert got == {(2, 1), (4, 2)}


def test_shortfall_names_the_largest_memory_part():
    gb = 2 ** 30
    memory = {"params": 1 * gb, "activations": 6 * gb, "optimizer": 2 * gb, "total": 9 * gb}
    message = shortfall([Plan({}, StepCost(1.0, 1.0, 0.0, memory, 0.0, {}), 1, 4 * gb)])
    assert "its largest part is activations (6.0 GB)" in message
    assert "needs 9.0 GB per GPU, 5.0 GB over the limit of 4.0 GB" in message


@pytest.mark.slow
def test_plan_cli_answers_for_1b_hybrid_at_1m_on_64_gpus(tmp_path):
    out = tmp_path / "plan.yaml"
    run = subprocess.run([sys.executable, "-m", "longtrain", "plan", os.path.join(ROOT, "configs", "hybrid_1b.yaml"),
                          "--gpus", "64", "--seq", "1M", "--write", str(out)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "64" in run.stdout and "tok/s" in run.stdout
    planned = load_config(str(out))
    assert planned.data.seq_len == 2 ** 20 and 64 % planned.parallel.sp_size == 0


@pytest.mark.slow
def test_written_plan_trains(tmp_path):
    """A plan for 2 CPU ranks is a config `longtrain launch` accepts and runs."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"))
    plans = [p for p in search(cfg, load_profile("h100-nvlink-ib"), 2, 256, 2) if p.fits]
    path = tmp_path / "plan.yaml"
    write_plan(cfg, plans[0], str(path), "test")
    run = subprocess.run([sys.executable, "-m", "longtrain", "launch", "--nproc", "2", str(path), "train.steps=2",
                          "train.eval_every=0", f"run.dir={tmp_path / 'run'}", "wandb.mode=disabled",
                          "run.progress=false", "train.device=cpu"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_calibrate_writes_a_loadable_profile(tmp_path):
    out = tmp_path / "cpu.yaml"
    run = subprocess.run([sys.executable, "-m", "longtrain", "calibrate", "--nproc", "3", "--lengths", "128", "256",
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    hw = load_profile(str(out))
    assert hw.matmul_flops > 0 and hw.attention_flops(200, False) > 0 and hw.linear_flops > 0
    assert all(link.bandwidth > 0 for link in hw.intra.values())
    # 3 ranks: Ulysses on 6 heads, no USP (U=2 does not divide P); the algorithms' host work is measurable on gloo
    # (one op timed on a busy machine may come in under its prediction: that one is 0, never negative)
    assert set(hw.step_overhead) == {"ring", "allgather", "ulysses", "lasp1", "lasp2", "zeco", "linear_ulysses"}
    overheads = [t for pair in hw.step_overhead.values() for t in pair]
    assert min(overheads) >= 0 and sum(t > 0 for t in overheads) >= len(overheads) // 2


def test_plan_cli_rejects_bad_sizes_in_one_line(capsys):
    from longtrain.launch.cli import main
    tiny = os.path.join(ROOT, "configs", "tiny.yaml")
    assert main(["plan", "--gpus", "4", "--seq", "0", tiny]) == 2
    assert "--seq and --gpus must be > 0" in capsys.readouterr().err
    assert main(["plan", "--gpus", "4", "--seq", "4K", "--doc-len", "8192", tiny]) == 2
    assert "--doc-len must be in 1..4096" in capsys.readouterr().err


def test_planner_resets_ulysses_size_outside_usp():
    """A base config's ulysses_size does not hide the splits whose SP degree it does not divide."""
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), ["parallel.ulysses_size=2"])
    plans = search(cfg, load_profile("h100-nvlink-ib"), 4, 2048, 4)
    assert {p.overrides["parallel.sp_size"] for p in plans} == {1, 2, 4}
