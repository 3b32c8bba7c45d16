"""The training loop: mesh, model, data, AdamW with warmup + cosine, SP-sharded loss, checkpoints, metrics."""
import math
import os
import signal
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longtrain.attention import LINEAR_FAMILY, AttnContext
from longtrain.config import Config, ConfigError, layer_mixers
from longtrain.parallel import (STATE_PASSING_SP, SPContext, comm, document_gates, local_positions, sequence_spans,
                                pad_sequence, shard_sequence)
from longtrain.parallel.mesh import build_mesh
from longtrain.parallel.sharding import num_chunks
from longtrain.trainer.checkpoint import resume_path, set_aside_earlier_run
from longtrain.trainer.data import Batch, DataLoader
from longtrain.trainer.metrics import MetricsLogger, peak_flops, peak_memory_bytes
from longtrain.trainer.model import LM
from longtrain.trainer.parallelize import build_engine
from longtrain.trainer.plot import plot_run
from longtrain.trainer.profile import trace_dir, traced


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # each saves a checkpoint and stops


def init_distributed(device_type: str) -> None:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=timedelta(minutes=10))


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def run_name(cfg: Config) -> str:
    """{model}-{sp}-{N}, e.g. gla*3,softmax-sp2-lasp2+ring-N256."""
    sp = f"sp{cfg.parallel.sp_size}-{cfg.parallel.linear_sp}+{cfg.parallel.softmax_sp}"
    model = ",".join(cfg.model.layers) if cfg.model.layers else cfg.model.pattern
    return f"{model}-{sp}-N{cfg.data.seq_len}"


class Trainer:
    """One object per process; `fit()` runs until cfg.train.steps or a stop signal."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        want = cfg.train.device
        self.device = torch.device("cuda" if want == "auto" and torch.cuda.is_available() else
                                   ("cpu" if want == "auto" else want))
        init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank0 = self.rank == 0
        self.mesh = build_mesh(cfg.parallel.sp_size, self.device.type)
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        torch.manual_seed(cfg.train.seed)
        self.lm = LM(cfg.model).to(self.device)  # the bare model: parameters
        self.flops_per_token = self.lm.flops_per_token(cfg.data.seq_len)  # before ZeRO-3 partitions the weights
        self.engine = build_engine(self.lm, self.mesh, cfg, self.device, bf16)  # forward, backward, step, save, load
        self.loader = DataLoader(cfg.data, self.mesh.dp_rank, self.mesh.dp_size, "train")
        self.eval_loader = DataLoader(cfg.data, self.mesh.dp_rank, self.mesh.dp_size, "eval")
        self.step = 0
        self.signal_received = False  # set by a signal handler on this rank only
        self.stop_requested = False  # agreed by every rank, so all of them save and stop together
        self.saved_step, self.saved_path = None, None  # the last checkpoint written or resumed from
        os.makedirs(cfg.run.dir, exist_ok=True)
        self.sp = None if self.mesh.sp_size == 1 else SPContext(
            self.mesh.sp_group, cfg.parallel.softmax_sp, cfg.parallel.linear_sp, cfg.parallel.layout,
            cfg.parallel.zeco_blocks, cfg.parallel.ulysses_size)
        # LASP-1/2 and ZeCO layers share one gather of document boundaries per micro-batch
        self.has_linear_sp = self.sp is not None and cfg.parallel.linear_sp in STATE_PASSING_SP and \
            any(name in LINEAR_FAMILY for name in layer_mixers(cfg.model))
        if cfg.run.resume:
            self.resume()
        if self.rank0:
            if self.saved_path is None:  # a run from step 0: an earlier one's outputs go aside, kept whole
                set_aside_earlier_run(cfg.run.dir)
            OmegaConf.save(cfg, os.path.join(cfg.run.dir, "config.yaml"))
        self.metrics = MetricsLogger(cfg.run.dir, self.rank0, OmegaConf.to_container(cfg), cfg.wandb, run_name(cfg),
                                     cfg.train.steps, cfg.run.progress, self.step)

    def shard(self, batch: Batch) -> tuple[Batch, AttnContext]:
        """This SP rank's tokens of the batch and the attention context that goes with them."""
        N = batch.tokens.shape[1]
        if self.sp is None:
            return batch, AttnContext(torch.arange(N, device=self.device), N, batch.segment_ids, None,
                                      self.cfg.kernels.backend)
        parts = num_chunks(self.mesh.sp_size, self.cfg.parallel.layout)
        if N % parts and self.cfg.parallel.pad:
            tokens, _ = pad_sequence(batch.tokens, parts)
            targets, _ = pad_sequence(batch.targets, parts)
            mask, _ = pad_sequence(batch.loss_mask, parts, pad_id=False)
            segment_ids = None if batch.segment_ids is None else \
                pad_sequence(batch.segment_ids, parts, pad_id=-1)[0]  # padding is its own document
            batch = Batch(tokens, targets, mask, segment_ids)
        group, layout = self.mesh.sp_group, self.cfg.parallel.layout
        local = Batch(*(None if t is None else shard_sequence(t, 1, group, layout)
                        for t in (batch.tokens, batch.targets, batch.loss_mask, batch.segment_ids)))
        positions = local_positions(local.tokens.shape[1], group, layout, self.device)
        doc_gates = document_gates(local.segment_ids, group, layout) if self.has_linear_sp else None
        doc_spans = None  # ring skips chunk pairs without a shared document; every SP rank holds the full ids
        if self.cfg.parallel.softmax_sp == "ring":
            doc_spans = sequence_spans(batch.segment_ids, self.mesh.sp_size, layout)
        return local, AttnContext(positions, N, local.segment_ids, self.sp, self.cfg.kernels.backend, doc_gates,
                                  doc_spans)

    def forward_loss(self, batch: Batch, accuracy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum of masked token losses, number of masked tokens, number predicted right or 0) on local tokens."""
        low = int(torch.minimum(batch.tokens.min(), batch.targets.min()))  # on the CPU still: no device sync
        high = int(torch.maximum(batch.tokens.max(), batch.targets.max()))
        if low < 0 or high >= self.cfg.model.vocab_size:  # on a GPU the embedding would fail a device-side assert
            raise ConfigError(f"the data holds token id {low if low < 0 else high}, outside model.vocab_size="
                              f"{self.cfg.model.vocab_size} (data.source={self.cfg.data.source!r})")
        local, ctx = self.shard(batch.to(self.device))
        with self.autocast:  # the model's chunked head returns the loss, never the full logits
            loss_sum, correct = self.engine.model(local.tokens, ctx, local.targets, local.loss_mask)
        return loss_sum, local.loss_mask.sum(), correct if accuracy else torch.zeros((), device=self.device)

    def stop_agreed(self) -> bool:
        """True on every rank once any rank has received a stop signal (one tiny all-reduce)."""
        return all_reduce_sum(torch.tensor([float(self.signal_received)], device=self.device)).item() > 0

    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches; {} and no step when a stop is agreed before one."""
        t0 = time.perf_counter()
        bytes_before = comm.snapshot()
        start = self.loader.position
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        # Every SP rank holds the full sequences, so SP rank 0 alone counts them (padding never counts).
        tokens_here = sum(b.loss_mask.sum().item() for b in batches) if self.mesh.sp_rank == 0 else 0
        # One small all-reduce agrees on the global token count and on stopping (a signal may reach one rank).
        agreed = all_reduce_sum(torch.tensor([tokens_here, float(self.signal_received)], device=self.device,
                                             dtype=torch.float64))
        total_tokens, self.stop_requested = max(agreed[0].item(), 1.0), agreed[1].item() > 0
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i and self.engine.can_drop_partial_step:  # else it stops at step boundaries only
                self.stop_requested = self.stop_agreed()
            if self.stop_requested:  # drop the partial step: the checkpoint holds the last whole one
                self.engine.zero_grad()
                self.loader.load_state_dict({"position": start})
                return {}
            loss, _, _ = self.forward_loss(batch)
            self.engine.backward(loss, total_tokens, last_micro=i == len(batches) - 1)
            loss_sum += loss.detach().double()
        lr = lr_at(self.step, self.cfg.train)
        grad_norm = self.engine.step(lr)
        loss = all_reduce_sum(loss_sum).item() / total_tokens
        self.step += 1
        dt = time.perf_counter() - t0
        tokens = self.mesh.dp_size * sum(b.tokens.numel() for b in batches)
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / dt, "step_time_s": dt,
               "peak_mem_gb": peak_memory_bytes(self.device) / 2 ** 30}
        peak = peak_flops(self.device)
        if peak:
            flops = self.flops_per_token * tokens / dt
            out["mfu"] = flops / (peak * self.world)
        after = comm.snapshot()
        out.update({k: after[k] - bytes_before.get(k, 0) for k in after})
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and answer accuracy (on the loss-mask positions) over cfg.train.eval_batches fresh batches."""
        self.engine.model.eval()
        self.eval_loader.load_state_dict({"position": 0})  # the same eval batches every time
        totals = torch.zeros(3, device=self.device, dtype=torch.float64)
        for _ in range(self.cfg.train.eval_batches):
            loss, count, correct = self.forward_loss(self.eval_loader.next_batch(), accuracy=True)
            totals += torch.stack([loss.double(), count.double(), correct.double()])
        loss, count, correct = all_reduce_sum(totals).tolist()
        self.engine.model.train()
        return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}

    def checkpoint_extra(self) -> dict:
        return {"step": self.step, "data_position": self.loader.position, "rng": torch.get_rng_state()}

    def save(self) -> None:
        self.saved_path = self.engine.save(self.cfg.run.dir, self.step, self.checkpoint_extra(),
                                           self.cfg.train.keep_last, self.rank0)
        self.saved_step = self.step

    def resume(self) -> None:
        """Continue from the newest intact checkpoint in run.dir (or stop when run.resume=strict and it is not)."""
        path = resume_path(self.cfg.run.dir, self.cfg.run.resume == "strict", self.rank0)
        if path is None:
            return
        extra = self.engine.load(path, self.checkpoint_extra())
        self.step = int(extra["step"])
        self.loader.load_state_dict({"position": extra["data_position"]})
        torch.set_rng_state(extra["rng"])
        self.saved_step, self.saved_path = self.step, path
        if self.rank0:
            print(f"resumed from {path}")

    def request_stop(self, signum, frame) -> None:
        self.signal_received = True

    def fit(self) -> dict:
        """Train to cfg.train.steps, then save; SIGINT/SIGTERM/SIGUSR1/SIGHUP stop at the next micro-step and save."""
        t = self.cfg.train
        previous = {sig: signal.signal(sig, self.request_stop) for sig in STOP_SIGNALS}
        last = {}
        if self.step >= t.steps and self.rank0:
            print(f"nothing to train: {self.saved_path} is at step {self.step}, train.steps={t.steps}")
        while self.step < t.steps:
            tracing = self.step + 1 == t.profile_step
            with traced(self.cfg.run.dir, t.profile_step, self.rank, self.device) if tracing else nullcontext():
                out = self.train_step()
            if tracing and self.rank0:
                print(f"trace of step {t.profile_step}{' (cut by the stop)' if self.stop_requested else ''}: "
                      f"{trace_dir(self.cfg.run.dir, t.profile_step)}/ (a Chrome trace per rank, for "
                      f"https://ui.perfetto.dev)")
            if self.stop_requested:
                break
            last = out
            self.metrics.advance(self.step)
            if self.step % t.log_every == 0 or self.step == t.steps:
                self.metrics.log(self.step, last)
            if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                last.update({f"eval_{k}": v for k, v in self.evaluate().items()})
                self.metrics.log(self.step, {k[5:]: v for k, v in last.items() if k.startswith("eval_")}, "eval")
            if t.save_every and self.step % t.save_every == 0:
                self.save()
        if t.save_last and self.saved_step != self.step:
            self.save()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        self.metrics.close()
        if self.rank0:
            saved = (f"saved in {self.saved_path}" if self.saved_step == self.step else
                     "not saved (train.save_last=false)")
            print(f"{'stop requested' if self.stop_requested else 'done'}: step {self.step} {saved}")
            plot = None if self.stop_requested else plot_run(self.cfg.run.dir)  # a stop keeps to its time budget
            print(f"outputs in {self.cfg.run.dir}: config.yaml, metrics.jsonl{', metrics.png' if plot else ''}"
                  f"{', checkpoints/' if self.saved_path else ''}")
        return last


def train(cfg: Config) -> dict:
    """Build a Trainer for cfg and run it; returns the last step's metrics."""
    last = Trainer(cfg).fit()
    if dist.is_initialized():  # after an error the process exits instead: on NCCL, destroying the group would wait
        dist.destroy_process_group()  # for peers' operations that never come, so torchrun could not end the run
    return last
