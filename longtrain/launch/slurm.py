"""Write an sbatch script: one srun task per node, each running torchrun with a c10d rendezvous on the head node.

The script is requeue friendly: SLURM signals the batch shell (USR1) two minutes before the time limit;
the shell forwards SIGTERM to the training processes, which checkpoint and exit, then requeues the job.
The requeued job finds the checkpoint in run.dir and resumes.
"""
import os
import shlex
import time

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
#SBATCH --cpus-per-task={cpus_per_task}
#SBATCH --output={output}/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
{optional}
set -euo pipefail

# NCCL: fail fast instead of hanging when a rank dies; warnings only in the log.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
# One data-loading/CPU thread budget per GPU process.
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{omp_threads}}}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))  # unique per job, so two jobs on one node do not collide

checkpoint_and_requeue() {{
  echo "time limit near: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
  wait "$SRUN_PID" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
trap checkpoint_and_requeue USR1

srun --kill-on-bad-exit=1 bash -c "exec {python} -m torch.distributed.run \\
  --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node={gpus_per_node} \\
  --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:$RDZV_PORT --rdzv-id=$SLURM_JOB_ID \\
  --max-restarts={max_restarts} -m longtrain train {train_args}" &
SRUN_PID=$!
wait "$SRUN_PID"
"""


def slurm_script(config: str, overrides: list[str], nodes: int, gpus_per_node: int, partition: str | None = None,
                 time_limit: str | None = None, account: str | None = None, output: str = "slurm",
                 max_restarts: int = 3, cpus_per_task: int | None = None, python: str = "python") -> str:
    """The sbatch script text for training `config` on `nodes` x `gpus_per_node` GPUs."""
    optional = [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("time", time_limit),
                                                   ("account", account)) if v]
    cpus = cpus_per_task or 8 * gpus_per_node
    return TEMPLATE.format(job_name=f"longtrain-{os.path.splitext(os.path.basename(config))[0]}", nodes=nodes,
                           gpus_per_node=gpus_per_node, cpus_per_task=cpus, output=output,
                           optional="\n".join(optional), omp_threads=max(1, cpus // gpus_per_node),
                           python=python, max_restarts=max_restarts,
                           train_args=" ".join(shlex.quote(a) for a in [os.path.abspath(config), *overrides]))


def write_script(text: str, output: str) -> str:
    """Write the script into `output` with a timestamped name; returns its path."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, f"longtrain-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path
