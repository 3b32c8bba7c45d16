"""End-to-end training on CPU: learning, bitwise resume, metrics, wandb offline, packing, SP exactness, resharding."""
import glob
import gzip
import json
import os
import shutil
import signal
import struct

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from longtrain.attention import LINEAR_FAMILY, AttnContext
from longtrain.config import load_config
from longtrain.launch.cli import main as cli
from longtrain.parallel import comm
from longtrain.parallel.spawn import run_distributed
from longtrain.trainer.checkpoint import (CheckpointError, begin, commit, complete_checkpoints, load_checkpoint,
                                          load_deepspeed_checkpoint)
from longtrain.trainer.model import LM
from longtrain.trainer.data import DataLoader
from longtrain.trainer.metrics import peak_flops
from longtrain.trainer.train import Trainer, lr_at, train

pytestmark = pytest.mark.slow
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.yaml")
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.pattern=gla,softmax", "model.vocab_size=32",
         "model.chunk_size=8", "data.seq_len=32", "data.batch_size=4", "data.mqar_pairs=4", "data.mqar_vocab=32",
         "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0", "run.progress=false",
         "parallel.sp_size=1", "wandb.mode=disabled"]


def small_config(tmp_path, *extra):
    return load_config(TINY, SMALL + [f"run.dir={tmp_path}"] + list(extra))


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


def test_loss_decreases_and_metrics_have_the_named_fields(tmp_path):
    train(small_config(tmp_path, "train.steps=20", "train.eval_every=10"))
    curve = losses(tmp_path)
    assert sum(curve[s] for s in range(16, 21)) < sum(curve[s] for s in range(1, 6))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_fields = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/step_time_s",
                    "train/peak_mem_gb"}
    assert train_fields <= set(records[0])
    assert any("eval/accuracy" in r and "eval/loss" in r for r in records)
    assert (tmp_path / "config.yaml").exists()


def test_lr_schedule_warms_up_then_follows_the_cosine_to_its_floor():
    t = small_config("unused", "train.lr=1.0", "train.warmup_steps=4", "train.steps=12", "train.min_lr_ratio=0.1").train
    want = {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.1 + 0.9 * 0.5, 12: 0.1, 20: 0.1}  # cosine halfway: the mean of lr and floor
    assert {step: round(lr_at(step, t), 12) for step in want} == want


def test_accumulated_step_logs_the_full_batch_loss_and_gradient_norm(tmp_path):
    """grad_accum=2: the logged loss, lr and gradient norm are those of both micro-batches as one batch, computed
    here with F.cross_entropy on the model's full logits."""
    cfg = small_config(tmp_path, "train.steps=1", "train.grad_accum=2", "train.grad_clip=1e9")
    train(cfg)
    record = json.loads(open(tmp_path / "metrics.jsonl").readline())
    torch.manual_seed(cfg.train.seed)
    model = LM(cfg.model)
    loader = DataLoader(cfg.data)
    micro = [loader.next_batch() for _ in range(2)]
    tokens, targets, mask = (torch.cat([getattr(b, key) for b in micro]) for key in ("tokens", "targets", "loss_mask"))
    N = tokens.shape[1]
    logits = model(tokens, AttnContext(torch.arange(N), N, None))
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    loss = (losses * mask.flatten()).sum() / mask.sum()
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert record["train/loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert record["train/grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert record["train/lr"] == pytest.approx(cfg.train.lr / cfg.train.warmup_steps)  # step 1 of the warmup


def test_weight_decay_shrinks_matrices_only(tmp_path):
    """With zero gradients AdamW's update is its decoupled decay alone: matrices (embedding included) scale by
    1 - lr * weight_decay; norm weights and biases stay as they are."""
    trainer = Trainer(small_config(tmp_path, "train.weight_decay=0.1"))
    before = {name: p.detach().clone() for name, p in trainer.lm.named_parameters()}
    for p in trainer.lm.parameters():
        p.grad = torch.zeros_like(p)
    trainer.engine.step(lr=0.5)
    for name, p in trainer.lm.named_parameters():
        want = before[name] * (1 - 0.5 * 0.1) if p.dim() >= 2 else before[name]
        torch.testing.assert_close(p.detach(), want, atol=0, rtol=1e-6, msg=name)
    assert any(p.dim() < 2 for p in trainer.lm.parameters()) and any(p.dim() >= 2 for p in trainer.lm.parameters())


def test_evaluation_sees_the_same_batches_every_time(tmp_path):
    trainer = Trainer(small_config(tmp_path, "train.eval_batches=2"))
    assert trainer.evaluate() == trainer.evaluate()  # same weights, same batches: the same numbers


def test_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(small_config(full, "train.steps=20"))
    train(small_config(part, "train.steps=20", "train.save_every=10"))
    assert sorted(os.listdir(part / "checkpoints")) == ["step_00000010", "step_00000020"]
    shutil.rmtree(part / "checkpoints" / "step_00000020")  # as if killed after step 10's checkpoint
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train/lo')  # ... while it wrote a line
    train(small_config(part, "train.steps=20"))
    resumed, reference = losses(part), losses(full)
    steps = [json.loads(line)["step"] for line in open(part / "metrics.jsonl")]
    assert steps == list(range(1, 21))  # steps 11-20 of the killed run dropped, not logged twice
    assert [resumed[s] for s in range(11, 21)] == [reference[s] for s in range(11, 21)]


def test_resume_false_sets_the_earlier_run_aside(tmp_path, capsys):
    train(small_config(tmp_path, "train.steps=4", "train.save_every=2", "train.warmup_steps=3"))
    train(small_config(tmp_path, "train.steps=2", "run.resume=false"))
    assert "the earlier run's outputs moved to" in capsys.readouterr().out
    (aside,) = glob.glob(str(tmp_path / "superseded_*"))
    assert sorted(os.listdir(os.path.join(aside, "checkpoints"))) == ["step_00000002", "step_00000004"]
    assert load_config(os.path.join(aside, "config.yaml")).train.warmup_steps == 3  # the config that wrote them
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000002"]
    assert sorted(losses(tmp_path)) == [1, 2] and sorted(losses(aside)) == [1, 2, 3, 4]
    resumed = Trainer(small_config(tmp_path, "train.steps=4"))
    assert resumed.step == 2  # this run's checkpoint, not the earlier run's step 4


def test_a_run_resumed_at_its_last_step_says_there_is_nothing_to_train(tmp_path, capsys):
    train(small_config(tmp_path, "train.steps=2"))
    train(small_config(tmp_path, "train.steps=1"))
    assert f"nothing to train: {tmp_path}/checkpoints/step_00000002 is at step 2, train.steps=1" in \
        capsys.readouterr().out


def test_a_run_with_nothing_to_resume_sets_the_earlier_metrics_aside(tmp_path):
    train(small_config(tmp_path, "train.steps=3", "train.save_last=false"))
    train(small_config(tmp_path, "train.steps=1", "train.save_last=false"))
    (aside,) = glob.glob(str(tmp_path / "superseded_*"))
    assert sorted(losses(aside)) == [1, 2, 3] and sorted(losses(tmp_path)) == [1]


def test_a_checkpoint_of_another_engine_kind_is_a_one_line_error(tmp_path):
    dcp_dir, ds_dir = tmp_path / "dcp", tmp_path / "ds_ckpt"
    os.makedirs(dcp_dir)
    os.makedirs(ds_dir / "ds")
    with pytest.raises(CheckpointError, match="written by train.engine=fsdp/ddp and cannot load into train.engine="
                                              "deepspeed"):
        load_deepspeed_checkpoint(str(dcp_dir), engine=None)
    with pytest.raises(CheckpointError, match="written by train.engine=deepspeed"):
        load_checkpoint(str(ds_dir), None, None, {})


def test_a_failed_run_leaves_the_process_group_to_process_exit(tmp_path, monkeypatch):
    """On NCCL, destroying the group after one rank's error waits for its peers' unmatched operations (a hang
    torchrun cannot end): only a run that ends well destroys it."""
    destroy = dist.destroy_process_group
    destroyed = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda: destroyed.append(True))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        def fail(self):
            raise RuntimeError("a rank's out-of-memory")
        with monkeypatch.context() as m:
            m.setattr(Trainer, "train_step", fail)
            with pytest.raises(RuntimeError, match="out-of-memory"):
                train(small_config(tmp_path / "a", "train.steps=1"))
        assert destroyed == [] and dist.is_initialized()
        train(small_config(tmp_path / "b", "train.steps=1"))
        assert destroyed == [True]
    finally:
        destroy()


def test_profile_step_writes_a_trace_of_that_step_only(tmp_path, capsys):
    train(small_config(tmp_path, "train.steps=3", "train.profile_step=2"))
    assert os.listdir(tmp_path / "profile") == ["step_00000002"]
    trace = json.load(gzip.open(tmp_path / "profile" / "step_00000002" / "rank0.json.gz"))
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"aten::mm", "Optimizer.step#AdamW.step"} <= names  # forward, backward and the optimizer step
    assert capsys.readouterr().out.count("trace of step 2") == 1


def test_keep_last_k(tmp_path):
    train(small_config(tmp_path, "train.steps=6", "train.save_every=2", "train.keep_last=2"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("keep_last", range(1, 8))
def test_keep_last_k_keeps_the_newest_k_of_any_count(tmp_path, keep_last):
    for step in range(1, 7):
        tmp, final = begin(str(tmp_path), step, rank0=True)
        os.makedirs(tmp)
        commit(str(tmp_path), tmp, final, keep_last, rank0=True)
        kept = [s for s, _ in complete_checkpoints(str(tmp_path))]
        assert kept == list(range(max(1, step - keep_last + 1), step + 1)), (keep_last, step, kept)


def test_signal_saves_a_checkpoint_and_stops(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path, "train.steps=50"))
    real_step = trainer.train_step

    def step_then_signal():
        out = real_step()
        if trainer.step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return out

    monkeypatch.setattr(trainer, "train_step", step_then_signal)
    trainer.fit()
    assert trainer.step == 3  # agreed at the next micro-step boundary: step 4 never starts
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000003"]


def test_a_stop_between_micro_steps_drops_the_partial_step(tmp_path, monkeypatch):
    trainer = Trainer(small_config(tmp_path, "train.steps=50", "train.grad_accum=3"))
    real_forward, calls, positions = trainer.forward_loss, [], {}
    real_step = trainer.train_step

    def forward_then_signal(batch, accuracy=False):
        calls.append(1)
        if len(calls) == 8:  # the second micro-step of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(batch, accuracy)

    def step_and_record():
        out = real_step()
        positions[trainer.step] = trainer.loader.position
        return out

    monkeypatch.setattr(trainer, "forward_loss", forward_then_signal)
    monkeypatch.setattr(trainer, "train_step", step_and_record)
    trainer.fit()
    assert len(calls) == 8 and trainer.step == 2 and trainer.loader.position == positions[2] == 2 * 3 * 4
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000002"]
    assert Trainer(small_config(tmp_path, "train.steps=50")).loader.position == 2 * 3 * 4


def worker_one_rank_signalled(rank, world, tmp):
    """Only rank 1 gets the signal, in the second micro-step of step 3: both ranks drop that step and save step 2."""
    trainer = Trainer(small_config(f"{tmp}/run", "train.steps=50", "train.grad_accum=3", "data.batch_size=2"))
    real_forward, calls = trainer.forward_loss, []

    def forward_then_signal(batch, accuracy=False):
        calls.append(1)
        if rank == 1 and len(calls) == 8:
            trainer.signal_received = True
        return real_forward(batch, accuracy)

    trainer.forward_loss = forward_then_signal
    trainer.fit()
    return trainer.step, trainer.saved_step


def test_a_signal_that_reaches_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    assert run_distributed(worker_one_rank_signalled, 2, str(tmp_path), timeout=120) == [(2, 2), (2, 2)]


def test_every_run_ends_with_a_checkpoint_a_plot_and_where_the_outputs_are(tmp_path, capsys):
    train(small_config(tmp_path, "train.steps=3", "train.save_every=50", "train.eval_every=2"))
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000003"]
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 700)  # 10 x 7 in, 100 dpi
    assert capsys.readouterr().out.splitlines()[-2:] == [
        f"done: step 3 saved in {tmp_path}/checkpoints/step_00000003",
        f"outputs in {tmp_path}: config.yaml, metrics.jsonl, metrics.png, checkpoints/"]
    os.remove(tmp_path / "metrics.png")
    assert cli(["plot", str(tmp_path)]) == 0 and (tmp_path / "metrics.png").exists()
    assert cli(["plot", str(tmp_path / "checkpoints")]) == 2


def test_plot_draws_each_metric_against_its_steps(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    records = [{"step": 1, "train/loss": 3.0, "train/tokens_per_s": 10.0, "train/peak_mem_gb": 1.0},
               {"step": 2, "eval/accuracy": 0.5},
               {"step": 3, "train/loss": 2.0, "train/tokens_per_s": 12.0, "train/peak_mem_gb": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    assert cli(["plot", str(tmp_path)]) == 0
    panels = {ax.get_title(): [line.get_xydata().tolist() for line in ax.get_lines()] for ax in figures[0].axes}
    assert panels == {"train loss": [[[1, 3.0], [3, 2.0]]], "eval accuracy": [[[2, 0.5]]],
                      "tokens/s": [[[1, 10.0], [3, 12.0]]], "peak memory (GB)": [[[1, 1.0], [3, 1.5]]]}


def test_save_last_false_writes_no_checkpoint(tmp_path, capsys):
    """Benchmark runs (gpu_check) skip the final save: nothing under checkpoints/, and the last line says so."""
    train(small_config(tmp_path, "train.steps=2", "train.save_last=false"))
    assert not os.path.exists(tmp_path / "checkpoints")
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "done: step 2 not saved (train.save_last=false)",
        f"outputs in {tmp_path}: config.yaml, metrics.jsonl, metrics.png"]


def test_half_written_checkpoint_is_ignored(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "step_00000005.tmp")
    trainer = Trainer(small_config(tmp_path, "train.steps=1"))
    assert trainer.step == 0


def test_wandb_offline_writes_a_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tmp_path / "run", "train.steps=2", "wandb.mode=offline")
    train(cfg)
    assert glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*"))
    assert (tmp_path / "run" / "wandb_id.txt").exists()


def test_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train(small_config(tmp_path / "run", "train.steps=2", "train.save_every=2", "wandb.mode=offline"))
    train(small_config(tmp_path / "run", "train.steps=4", "wandb.mode=offline"))
    run_files = glob.glob(str(tmp_path / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text()
    assert len(run_files) == 2 and all(os.path.basename(f) == f"run-{run_id}.wandb" for f in run_files)


@pytest.mark.parametrize("pattern", ["gla,softmax", "mamba2,window", "retention,sigmoid", "lightning,gated_softmax",
                                     "linear,softmax"])
def test_packed_documents_do_not_see_each_other(pattern):
    """A packed document's logits equal running it alone (RoPE is relative, so its offset does not matter)."""
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", f"model.pattern={pattern}",
                             "model.window=5", "model.chunk_size=4"]).model
    torch.manual_seed(0)
    model = LM(cfg).double()
    tokens = torch.randint(0, 256, (1, 30))
    seg = torch.tensor([[0] * 11 + [1] * 19])
    packed = model(tokens, AttnContext(torch.arange(30), 30, seg))
    alone = model(tokens[:, 11:], AttnContext(torch.arange(19), 30))
    torch.testing.assert_close(packed[:, 11:], alone, atol=1e-10, rtol=0)


@pytest.mark.parametrize("pattern", ["softmax", "gated_softmax", "linear", "retention,softmax"])
@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_matches_counted_matmul_flops(pattern, tied):
    """flops_per_token / 3 is the forward: torch's FLOP counter on a real forward pass, less the masked half
    of the square tiles the reference computes in full (N x N at N <= its block, C x C per linear chunk)."""
    from torch.utils.flop_counter import FlopCounterMode
    N = 128
    cfg = load_config(None, ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", f"model.pattern={pattern}",
                             "model.vocab_size=96", f"model.tie_embeddings={tied}"]).model
    model = LM(cfg)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.randint(0, 96, (2, N)), AttnContext.single(N))
    counted_per_token = counter.get_total_flops() / (2 * N)
    # q k^T and p v over a full tile: 2 * 2 * tile * d per token per layer, of which causality uses half
    masked_half = sum(2 * (cfg.chunk_size if name in LINEAR_FAMILY else N) * cfg.d_model for name in model.mixers)
    assert model.flops_per_token(N) / 3 == pytest.approx(counted_per_token - masked_half, rel=1e-9)


def test_window_flops_count_the_keys_in_the_window():
    """A window's attention term is the causal one times the visible pairs over the causal pairs, both counted
    on the masks (to O(1/W): the FLOP count takes half the diagonal)."""
    N, W = 1024, 128
    base = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.vocab_size=96", f"model.window={W}"]
    causal, window = (LM(load_config(None, base + [f"model.pattern={p}"]).model) for p in ("softmax", "window"))
    assert causal.matmul_params() == window.matmul_params()
    term = [m.flops_per_token(N) - 6 * m.matmul_params() for m in (causal, window)]
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    pairs = [(i >= j).sum().item(), ((i >= j) & (i - j < W)).sum().item()]
    assert term[1] / term[0] == pytest.approx(pairs[1] / pairs[0], rel=2e-3)
    wide = LM(load_config(None, base[:-1] + ["model.window=4096", "model.pattern=window"]).model)
    assert wide.flops_per_token(N) == causal.flops_per_token(N)  # a window wider than the sequence is causal


def test_peak_flops_by_gpu_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                       ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(cuda) == peak, name
    assert peak_flops(torch.device("cpu")) is None


def worker_mfu(rank, world, tmp):
    import longtrain.trainer.train as train_module
    train_module.peak_flops = lambda device: 1e9  # as a GPU of 1 GFLOP/s would report
    trainer = Trainer(small_config(f"{tmp}/run", "train.grad_accum=2", "data.batch_size=3"))
    out = trainer.train_step()
    return out["mfu"], out["step_time_s"], trainer.flops_per_token


def test_mfu_is_model_flops_over_the_peak_of_every_rank(tmp_path):
    """2 data-parallel ranks x 2 micro-batches x 3 sequences of 32 tokens per step, each rank's peak 1 GFLOP/s."""
    for mfu, seconds, flops_per_token in run_distributed(worker_mfu, 2, str(tmp_path)):
        assert mfu == pytest.approx(flops_per_token * (2 * 2 * 3 * 32) / seconds / (2 * 1e9), rel=1e-6)


SP_CASES = [("gla*3,softmax", "lasp2", "ring", "contiguous"), ("gla*3,softmax", "zeco", "allgather", "contiguous"),
            ("mamba2,window", "lasp1", "ring", "contiguous"), ("retention,sigmoid", "ulysses", "ulysses", "contiguous"),
            ("gla,gated_softmax", "lasp2", "ring", "zigzag"), ("lightning,softmax", "zeco", "usp", "contiguous"),
            ("linear,window", "lasp2", "allgather", "contiguous"), ("gla*3,softmax", "zeco", "ring", "zigzag"),
            ("mamba2,window", "lasp1", "allgather", "zigzag")]


def sp_step_matches_single_device(trainer, batch, n_tokens: int, name: str) -> None:
    """One SP forward/backward through the trainer equals the unsharded model on the same batch."""
    loss, count, _ = trainer.forward_loss(batch)
    total = count.double().clone()
    torch.distributed.all_reduce(total)
    trainer.engine.backward(loss, total.item(), last_micro=True)
    summed = loss.detach().double().clone()
    torch.distributed.all_reduce(summed)
    torch.manual_seed(trainer.cfg.train.seed)
    ref_model = LM(trainer.cfg.model)
    logits = ref_model(batch.tokens, AttnContext(torch.arange(n_tokens), n_tokens, batch.segment_ids))
    ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    ref_loss.backward()
    assert total.item() == batch.tokens.numel(), name  # padding never counts as a token
    assert abs(summed.item() / total.item() - ref_loss.item()) < 1e-5, name
    for (pname, p), ref in zip(trainer.lm.named_parameters(), ref_model.parameters()):
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad  # FSDP2 shards it
        err = (grad - ref.grad).abs().max().item()
        assert err < 2e-5, f"{name}: grad of {pname} differs by {err}"


def worker_model_sp(rank, world, tmp):
    for pattern, linear_sp, softmax_sp, layout in SP_CASES:
        extra = ["data.source=text", f"data.path={tmp}/docs", f"model.pattern={pattern}", "model.n_layers=4",
                 "model.window=7", f"parallel.linear_sp={linear_sp}", f"parallel.softmax_sp={softmax_sp}",
                 f"parallel.layout={layout}", "parallel.ulysses_size=2", "model.n_heads=4", "data.batch_size=2",
                 "model.vocab_size=257", "train.engine=ddp",
                 "model.activation_checkpointing=true"]  # recompute, communication included, must stay exact
        trainer = Trainer(small_config(f"{tmp}/sp{rank}", *extra, f"parallel.sp_size={world}"))
        batch = trainer.loader.next_batch()
        assert batch.segment_ids.max() > 0  # documents really are packed into the sequence
        comm.reset_counters()
        sp_step_matches_single_device(trainer, batch, 32, f"{pattern}/{linear_sp}/{softmax_sp}/{layout}")
        # one gather of document boundaries (first/last id of each local chunk, int64) for all layers and the
        # recompute, not one per linear layer; Ulysses gathers whole heads and needs none
        gather_bytes = (world - 1) * (2 if layout == "zigzag" else 1) * 2 * 2 * 8
        assert comm.BYTES_SENT["linear_gates"] == (0 if linear_sp == "ulysses" else gather_bytes), pattern


def write_docs(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, length in enumerate([7, 23, 5, 41, 13, 60, 9]):
        (docs / f"{i}.txt").write_text("".join(chr(97 + (i * 7 + j) % 26) for j in range(length)))


@pytest.mark.parametrize("world", [2, 4])
def test_model_under_sp_matches_single_device(world, tmp_path):
    write_docs(tmp_path)
    run_distributed(worker_model_sp, world, str(tmp_path))


def test_compiled_blocks_match_eager(tmp_path):
    """train.compile: the same loss and gradients as eager, and dynamo really compiled the blocks' norm + MLP."""
    grads = {}
    for compiled in (False, True):
        trainer = Trainer(small_config(tmp_path / str(compiled), f"train.compile={compiled}"))
        torch._dynamo.reset()  # an earlier compile in this process would otherwise serve this one from its cache
        counters.clear()
        loss, count, _ = trainer.forward_loss(trainer.loader.next_batch())
        trainer.engine.backward(loss, count.item(), last_micro=True)
        assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)  # blocks share one graph
        grads[compiled] = [loss.item()] + [p.grad.clone() for p in trainer.lm.parameters()]
    assert abs(grads[True][0] - grads[False][0]) < 1e-5
    for eager, compiled in zip(grads[False][1:], grads[True][1:]):
        torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def worker_compiled_sp(rank, world, tmp):
    extra = ["data.source=text", f"data.path={tmp}/docs", "model.pattern=gla,softmax", "model.vocab_size=257",
             "train.compile=true", "model.activation_checkpointing=true", f"parallel.sp_size={world}"]
    trainer = Trainer(small_config(f"{tmp}/sp{rank}", *extra))  # FSDP2 over the SP ranks, recompute of compiled code
    torch._dynamo.reset()
    counters.clear()
    sp_step_matches_single_device(trainer, trainer.loader.next_batch(), 32, "compiled")
    assert counters["stats"]["unique_graphs"] == 1  # both blocks, forward and recompute: one graph


def test_compiled_blocks_under_fsdp_and_sp_match_single_device(tmp_path):
    write_docs(tmp_path)
    run_distributed(worker_compiled_sp, 2, str(tmp_path))


def worker_train_and_save(rank, world, run_dir):
    cfg = small_config(run_dir, "train.steps=3", "train.save_every=3", "parallel.sp_size=2",
                       "parallel.linear_sp=lasp1", "parallel.softmax_sp=ring")
    trainer = Trainer(cfg)
    metrics = trainer.fit()
    # bytes per step and algorithm are logged, and match the formulas: one ring K/V block (B, Hkv=2, N/2, D=16,
    # fp32, 2 tensors) forward, and for LASP-1 one [B, H, Dk, Dv] fp32 state per rank (zigzag: rank 0 sends chunk
    # 0's state to rank 1, rank 1 sends chunk 2's back)
    assert metrics["comm/bytes_sent/ring_fwd"] == 2 * 4 * 2 * 16 * 16 * 4
    assert metrics["comm/bytes_sent/lasp1_fwd"] == 4 * 2 * 16 * 16 * 4
    full = get_model_state_dict(trainer.lm, options=StateDictOptions(full_state_dict=True))  # FSDP2: gathered
    return {k: v.detach().numpy().copy() for k, v in full.items()}  # by value, not shared memory


def test_checkpoint_saved_at_sp2_resumes_at_sp1(tmp_path):
    saved = run_distributed(worker_train_and_save, 2, str(tmp_path))[0]
    trainer = Trainer(small_config(tmp_path, "train.steps=4"))
    assert trainer.step == 3 and trainer.loader.position == 3 * 4
    for name, value in trainer.lm.state_dict().items():
        assert torch.equal(value, torch.from_numpy(saved[name])), name
    trainer.fit()
    assert trainer.step == 4


def worker_padding(rank, world, tmp):
    """N=30 over 4 ranks: padded runs equal the unpadded single-device loss and gradients."""
    for pattern, layout in [("gla,softmax", "contiguous"), ("softmax,sigmoid", "zigzag")]:
        extra = [f"model.pattern={pattern}", f"parallel.layout={layout}", "data.seq_len=30", "train.engine=ddp",
                 "parallel.pad=true", f"parallel.sp_size={world}", "data.source=text", f"data.path={tmp}/docs",
                 "model.vocab_size=257"]
        trainer = Trainer(small_config(f"{tmp}/pad{rank}", *extra))
        sp_step_matches_single_device(trainer, trainer.loader.next_batch(), 30, f"padded {pattern}/{layout}")


def test_padding_for_lengths_not_divisible_by_the_sp_degree(tmp_path):
    write_docs(tmp_path)
    run_distributed(worker_padding, 4, str(tmp_path))
