"""dp x sp layouts under FSDP2, DDP and DeepSpeed ZeRO, built by parallelize with chunked loss, checkpointing and
offload, train exactly like one plain process (full logits, no recompute) on the same global batch; each engine's
checkpoints resume exactly."""
import os

import numpy as np
import pytest
import torch

from longtrain.config import load_config
from longtrain.parallel.spawn import run_distributed
from longtrain.trainer.checkpoint import damage
from longtrain.trainer import parallelize
from longtrain.trainer.model import LM
from longtrain.trainer.train import Trainer

pytestmark = pytest.mark.slow
STEPS, MICRO = 3, 2
BASE = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.pattern=gla,softmax", "model.vocab_size=32",
        "model.chunk_size=8", "data.seq_len=32", "data.mqar_pairs=4", "data.mqar_vocab=32", "train.warmup_steps=1",
        f"train.steps={STEPS}", "train.eval_every=0", "train.log_every=1", "train.grad_accum=2",
        "run.progress=false", "run.resume=false", "wandb.mode=disabled"]


# (activation_checkpointing, checkpoint_mode, offload_activations, compile) per engine; loss over chunks of 8 tokens
MEMORY = {"fsdp": (True, "block", False, False), "ddp": (True, "mixer", True, True),
          "deepspeed": (True, "mixer", False, False)}


def config(run_dir, engine, sp, dp, zero_stage=2, plain=False, *extra):
    """The test model under `engine` at dp x sp; plain: today's full-logits loss, no recompute or offload."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ac, mode, offload, compiled = (False, "block", False, False) if plain else MEMORY[engine]
    memory = [f"model.loss_chunk={0 if plain else 8}", f"model.activation_checkpointing={ac}",
              f"model.checkpoint_mode={mode}", f"train.offload_activations={offload}", f"train.compile={compiled}"]
    return load_config(None, BASE + memory + [f"run.dir={run_dir}", f"train.engine={engine}", f"parallel.sp_size={sp}",
                                              f"data.batch_size={MICRO * 2 // dp}", f"train.zero_stage={zero_stage}",
                                              *extra])


def full_params(trainer) -> dict:
    """Every parameter in full, by name: ZeRO-3 partitions and FSDP2 DTensor shards gathered."""
    module = trainer.lm
    if trainer.cfg.train.engine == "deepspeed" and trainer.cfg.train.zero_stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            return {n: p.detach().clone().numpy() for n, p in module.named_parameters()}
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone().numpy()
            for n, p in module.named_parameters()}


def run(run_dir, engine, sp, dp, zero_stage=2, plain=False):
    """Losses per step, the final full parameters of a short training run and its FLOPs per token (for MFU)."""
    trainer = Trainer(config(run_dir, engine, sp, dp, zero_stage, plain))
    losses = [trainer.train_step()["loss"] for _ in range(STEPS)]
    return losses, full_params(trainer), trainer.flops_per_token


ENGINES = [("fsdp", 2), ("ddp", 2), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]


def worker(rank, world, tmp):
    results = {}
    layouts = [(1, 2), (2, 1)] if world == 2 else [(2, 2)]
    for engine, stage in ENGINES:
        for sp, dp in layouts:
            results[(engine, stage, sp, dp)] = run(f"{tmp}/{engine}{stage}-{sp}x{dp}-{world}", engine, sp, dp, stage)
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    return run_distributed(single_process_run, 1, str(tmp))[0]


def single_process_run(rank, world, tmp):
    return run(f"{tmp}/single", "ddp", 1, 1, plain=True)


@pytest.mark.parametrize("world", [2, 4])
def test_engines_match_one_process(world, reference, tmp_path):
    ref_losses, ref_params, _ = reference
    cfg = config(tmp_path, "ddp", 1, 1)
    flops_per_token = LM(cfg.model).flops_per_token(cfg.data.seq_len)  # of the unpartitioned model
    results = run_distributed(worker, world, str(tmp_path), timeout=600)[0]
    for (engine, stage, sp, dp), (losses, params, flops) in results.items():
        name = f"{engine}(zero {stage}) dp={dp} sp={sp}"
        assert flops == flops_per_token, name  # ZeRO-3 leaves empty weights behind
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, err_msg=name)
        for key, value in ref_params.items():
            np.testing.assert_allclose(params[key], value, atol=2e-5, err_msg=f"{name}: {key}")


def grad_norms(rank, world, tmp, engine, stage):
    trainer = Trainer(config(f"{tmp}/{engine}{stage}", engine, 1, world, stage, True))
    return [trainer.train_step()["grad_norm"] for _ in range(STEPS)]


def worker_clipping(rank, world, tmp):
    """The optimizer sees gradients of total norm train.grad_clip (computed over the full gradient, here from FSDP2
    shards or DDP's replicas); the step reports the norm before clipping."""
    out = {}
    for engine in ("fsdp", "ddp"):
        trainer = Trainer(config(f"{tmp}/{engine}", engine, 1, world, 2, False, "train.grad_clip=0.01"))
        seen = []
        step = trainer.engine.optimizer.step
        trainer.engine.optimizer.step = lambda: seen.append(sum(
            float((p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).pow(2).sum())
            for p in trainer.lm.parameters()) ** 0.5) or step()
        out[engine] = (trainer.train_step()["grad_norm"], seen[0])
    return out


def test_clipping_scales_the_full_gradient_to_the_limit(tmp_path):
    for result in run_distributed(worker_clipping, 2, str(tmp_path)):
        for engine, (before, seen) in result.items():
            assert before > 0.1 and seen == pytest.approx(0.01, rel=1e-5), engine


def test_deepspeed_reports_the_gradient_norm_at_every_zero_stage(tmp_path):
    """Stage 0 in fp32 leaves DeepSpeed without a norm of its own (it logged 0.0); every stage reports DDP's."""
    want = run_distributed(grad_norms, 2, str(tmp_path), "ddp", 0)[0]
    for stage in (0, 2):
        np.testing.assert_allclose(run_distributed(grad_norms, 2, str(tmp_path), "deepspeed", stage)[0], want,
                                   rtol=1e-5, err_msg=f"zero stage {stage}")


def bf16_run(rank, world, tmp):
    """First-step loss under bf16 and the dtype of a block's weights inside its forward."""
    cfg = load_config(None, BASE + [f"run.dir={tmp}/bf16-{world}-{rank}", "train.engine=fsdp", "parallel.sp_size=1",
                                    f"data.batch_size={MICRO * 2 // world}", "train.precision=bf16"])
    trainer = Trainer(cfg)
    seen = []
    trainer.lm.blocks[0].mlp.register_forward_pre_hook(lambda module, args: seen.append(module.w_down.weight.dtype))
    loss = trainer.train_step()["loss"]
    return loss, str(seen[0]), str(trainer.lm.blocks[0].mlp.w_down.weight.dtype)


def test_fsdp_bf16_gathers_bf16_parameters(tmp_path):
    """MixedPrecisionPolicy: bf16 parameters in the blocks' forward, fp32 sharded parameters, the loss of one
    process under autocast."""
    ref_loss, ref_dtype, _ = run_distributed(bf16_run, 1, str(tmp_path))[0]
    (loss, dtype, stored), _ = run_distributed(bf16_run, 2, str(tmp_path))
    assert (ref_dtype, dtype, stored) == ("torch.float32", "torch.bfloat16", "torch.float32")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-2)


def test_fsdp_policy_reduces_bf16_gradients_in_fp32(monkeypatch):
    """Every fully_shard call (each block, then the root) asks for bf16 gathers and fp32 gradient reductions."""
    policies = []
    monkeypatch.setattr(parallelize, "fully_shard",
                        lambda module, mesh, mp_policy: policies.append(mp_policy) or module)
    cfg = load_config(None, BASE)
    parallelize.wrap_fsdp(LM(cfg.model), None, bf16=True)
    assert len(policies) == cfg.model.n_layers + 1
    assert all((p.param_dtype, p.reduce_dtype) == (torch.bfloat16, torch.float32) for p in policies)


def save_and_resume(rank, world, tmp):
    """Per engine: a step, a save through the engine, two more steps; then a fresh Trainer loads that save through
    the engine and takes the same two steps."""
    results = {}
    for engine, stage in ENGINES:
        run_dir = f"{tmp}/{engine}{stage}"
        trainer = Trainer(config(run_dir, engine, 1, world, stage))
        trainer.train_step()
        trainer.save()
        saved = full_params(trainer)
        losses = [trainer.train_step()["loss"] for _ in range(STEPS - 1)]
        resumed = Trainer(config(run_dir, engine, 1, world, stage, False, "run.resume=true"))
        step, restored = resumed.step, full_params(resumed)
        resumed_losses = [resumed.train_step()["loss"] for _ in range(STEPS - 1)]
        results[(engine, stage)] = (trainer.saved_path, step, saved, restored, losses, resumed_losses,
                                    full_params(trainer), full_params(resumed))
    return results


def test_each_engine_resumes_its_checkpoint_exactly(tmp_path):
    """DCP (fsdp, ddp) and DeepSpeed's own format, both with a manifest: the loaded parameters are the saved ones,
    and the resumed run's losses and parameters are those of the run that went on."""
    results = run_distributed(save_and_resume, 2, str(tmp_path), timeout=600)[0]
    for (engine, stage), (path, step, saved, restored, losses, resumed_losses, final, resumed_final) in results.items():
        name = f"{engine}(zero {stage})"
        assert damage(path) is None and step == 1, name
        assert os.path.isdir(os.path.join(path, "ds")) == (engine == "deepspeed"), name
        assert losses == resumed_losses, name
        for key, value in saved.items():
            np.testing.assert_array_equal(restored[key], value, err_msg=f"{name}: {key}")
            np.testing.assert_array_equal(resumed_final[key], final[key], err_msg=f"{name}: {key}")
