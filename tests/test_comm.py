"""The comm wrappers: NCCL's request semantics on gloo, the send-buffer check, the emulated slow link, Overlap."""
import time

import pytest
import torch

from longtrain.parallel import comm
from longtrain.parallel.spawn import run_distributed

pytestmark = pytest.mark.slow


def worker_requests(rank, world, mode):
    comm.emulate_nccl(mode == "nccl")
    group = torch.distributed.group.WORLD
    if rank == 0:
        reqs = comm.p2p([(torch.full((4,), float(i)), 1) for i in range(3)], [], group, "test")
    else:
        bufs = [torch.zeros(4) for _ in range(3)]
        reqs = comm.p2p([], [(b, 0) for b in bufs], group, "test")
    comm.wait(reqs)
    if rank == 1:
        assert [b[0].item() for b in bufs] == [0.0, 1.0, 2.0]
    return len(reqs)


@pytest.mark.parametrize("mode, n_requests", [("gloo", 3), ("nccl", 1)])
def test_nccl_mode_returns_one_request_per_batch(mode, n_requests):
    assert run_distributed(worker_requests, 2, mode) == [n_requests, n_requests]


def worker_in_order(rank, world):
    comm.emulate_nccl(True)
    group = torch.distributed.group.WORLD
    buf, other = torch.zeros(4), 1 - rank
    if rank == 0:  # a receive, then a send to the same peer: the send waits for the receive, as on NCCL
        got = comm.recv(buf, other, group, "test")
        sent = comm.send(torch.ones(4), other, group, "test")
        time.sleep(0.3)
        posted_early = sent.works[0].event.is_set()
        torch.distributed.barrier()  # not through the channels: rank 1 sends only now
        comm.wait([got, sent])
        return posted_early, buf.sum().item()
    torch.distributed.barrier()
    sent = comm.send(torch.full((4,), 2.0), other, group, "test")
    comm.wait([sent, comm.recv(buf, other, group, "test")])
    return False, buf.sum().item()


def test_nccl_mode_runs_a_peers_ops_in_posting_order():
    (posted_early, got0), (_, got1) = run_distributed(worker_in_order, 2)
    assert not posted_early and got0 == 8.0 and got1 == 4.0


def worker_send_buffer_reuse(rank, world, mode):
    comm.emulate_nccl(mode == "nccl")
    group = torch.distributed.group.WORLD
    for batched in (True, False):  # p2p's batch and the single send
        buf = torch.ones(1000)
        if rank == 0:
            reqs = comm.p2p([(buf, 1)], [], group, "test") if batched else [comm.send(buf, 1, group, "test")]
            buf.add_(1)  # reused before the send completed
            with pytest.raises(RuntimeError, match="send buffer"):
                comm.wait(reqs)
        else:
            comm.wait(comm.p2p([], [(buf, 0)], group, "test") if batched else [comm.recv(buf, 0, group, "test")])


@pytest.mark.parametrize("mode", ["gloo", "nccl"])
def test_writing_a_send_buffer_before_completion_fails(mode):
    run_distributed(worker_send_buffer_reuse, 2, mode)


def worker_slow_link(rank, world):
    group = torch.distributed.group.WORLD
    comm.set_link(latency_s=0.05)
    torch.distributed.barrier()
    start = time.perf_counter()
    if rank == 0:  # two sends share the link: the second leaves after the first
        reqs = comm.p2p([(torch.ones(8), 1), (torch.ones(8), 1)], [], group, "test")
        posted = time.perf_counter() - start
    else:
        reqs = comm.p2p([], [(torch.zeros(8), 0), (torch.zeros(8), 0)], group, "test")
        posted = 0.0
    comm.wait(reqs)
    p2p_time = time.perf_counter() - start
    start = time.perf_counter()
    _, req = comm.all_gather(torch.ones(4), group, "test", async_op=True)
    req.wait()
    return posted, p2p_time, time.perf_counter() - start


def test_slow_link_delays_messages_without_blocking_the_sender():
    (posted, send_time, gather_time), (_, recv_time, _) = run_distributed(worker_slow_link, 2)
    assert posted < 0.04  # the sender's thread goes on
    assert recv_time >= 0.1 and send_time >= 0.1  # two messages of 50 ms in sequence
    assert gather_time >= 0.05  # one hop of a 2-rank ring


def test_overlap_returns_the_result_and_raises_the_error():
    job = comm.Overlap(lambda: torch.ones(2) * 3, torch.device("cpu"))
    assert job.join().tolist() == [3.0, 3.0]
    job = comm.Overlap(lambda: 1 / 0, torch.device("cpu"))
    with pytest.raises(ZeroDivisionError):
        job.join()


def worker_mesh_groups(rank, world):
    from longtrain.parallel.mesh import build_mesh
    out = {}
    for sp in (world, world // 2):
        mesh = build_mesh(sp, "cpu")
        total = torch.ones(1)
        torch.distributed.all_reduce(total, group=mesh.sp_group)
        out[sp] = (mesh.sp_group is torch.distributed.group.WORLD, total.item())
    assert build_mesh(world, "cpu").sp_group is build_mesh(world, "cpu").sp_group  # made once, not per trainer
    return out


def test_sp_has_its_own_communicator_when_it_spans_the_world():
    """DeviceMesh hands back the default group for a dimension spanning the world, the group FSDP/DDP reduce
    over; on NCCL one group runs its operations in order, so SP's would queue behind gradient reductions."""
    assert run_distributed(worker_mesh_groups, 4) == [{4: (False, 4.0), 2: (False, 2.0)}] * 4
