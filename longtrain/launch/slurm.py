"""Write an sbatch script: one srun task per node, each running torchrun with a c10d rendezvous on the head node.

The script is requeue friendly: SLURM signals the batch shell (USR1) `signal_lead` seconds before the time
limit; the shell passes USR1 through srun (which would answer SIGTERM with SIGKILL) and torchrun to the training
processes, which finish the step, checkpoint and exit (torchrun waits up to run.stop_timeout for them), then it
requeues the job. The requeued job resumes from run.dir.
"""
import os
import shlex
import time

from longtrain.launch.torchrun import STOP_SIGNALS

TEMPLATE = """#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={gpus_per_node}
{cpus}
#SBATCH --output={output}/%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:USR1@{signal_lead}
{optional}
set -euo pipefail

# NCCL: fail fast instead of hanging when a rank dies; warnings only in the log.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${{NCCL_DEBUG:-WARN}}
# The node's CPUs shared by its GPU processes.
CPUS=${{SLURM_CPUS_ON_NODE:-$(nproc)}}
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-$(( CPUS / {gpus_per_node} > 0 ? CPUS / {gpus_per_node} : 1 ))}}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))  # unique per job, so two jobs on one node do not collide

checkpoint_and_requeue() {{
  echo "time limit near: asking the trainers to checkpoint, then requeueing job $SLURM_JOB_ID"
  # USR1, not TERM: srun forwards USR1 to its tasks but answers TERM or HUP with SIGKILL
  kill -USR1 "$SRUN_PID" 2>/dev/null || true
  wait "$SRUN_PID" || true
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}}
trap checkpoint_and_requeue USR1

srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS" bash -c "exec {python} -m longtrain.launch.torchrun \\
  --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node={gpus_per_node} \\
  --rdzv-backend=c10d --rdzv-endpoint=$HEAD_NODE:$RDZV_PORT --rdzv-id=$SLURM_JOB_ID \\
  --max-restarts={max_restarts} --signals-to-handle={signals} --shutdown-timeout={stop_timeout} \\
  -m longtrain train {train_args}" &
SRUN_PID=$!
wait "$SRUN_PID"
"""


def slurm_script(config: str, overrides: list[str], nodes: int, gpus_per_node: int, partition: str | None = None,
                 time_limit: str | None = None, account: str | None = None, output: str = "slurm",
                 max_restarts: int = 3, cpus_per_task: int | None = None, python: str = "python",
                 stop_timeout: int = 300, signal_lead: int | None = None) -> str:
    """The sbatch script text for training `config` on `nodes` x `gpus_per_node` GPUs.

    Without `cpus_per_task` the job takes whole nodes (--exclusive): each GPU process gets the node's CPUs / GPUs.
    `signal_lead` (default: stop_timeout + 60 s for the requeue) is how long before the limit the stop begins.
    """
    optional = [f"#SBATCH --{k}={v}" for k, v in (("partition", partition), ("time", time_limit),
                                                   ("account", account)) if v]
    cpus = f"#SBATCH --cpus-per-task={cpus_per_task}" if cpus_per_task else "#SBATCH --exclusive"
    return TEMPLATE.format(job_name=f"longtrain-{os.path.splitext(os.path.basename(config))[0]}", nodes=nodes,
                           gpus_per_node=gpus_per_node, cpus=cpus, output=output, optional="\n".join(optional),
                           signal_lead=signal_lead or stop_timeout + 60, python=python, max_restarts=max_restarts,
                           signals=STOP_SIGNALS, stop_timeout=stop_timeout,
                           train_args=" ".join(shlex.quote(a) for a in [os.path.abspath(config), *overrides]))


def write_script(text: str, output: str) -> str:
    """Write the script into `output` with a timestamped name; returns its path."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, f"longtrain-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path
