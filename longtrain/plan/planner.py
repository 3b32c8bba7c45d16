"""`longtrain plan`: search dp x sp, the SP algorithm of each mixer family, Ulysses size, ZeCO blocks, layout,
activation checkpointing and micro-batch for the fastest predicted step that fits in GPU memory.

Every candidate is a set of config overrides checked by the config's own validation, so a printed plan is one
`longtrain train|launch|slurm` accepts. The global batch (sequences per optimizer step) is fixed across
candidates, so their tokens per step are equal and their step times compare directly.
"""
from dataclasses import dataclass

from omegaconf import OmegaConf

from longtrain.attention import LINEAR_FAMILY
from longtrain.config import Config, ConfigError, layer_mixers, validate
from longtrain.plan.cost import Mask, StepCost, step_cost
from longtrain.plan.hardware import Hardware

MEMORY_FRACTION = 0.9  # of the GPU's memory: the allocator's fragmentation and the CUDA context take the rest
CHECKPOINTING = {"off": (False, "block"), "mixer": (True, "mixer"), "block": (True, "block")}
ZECO_BLOCKS = (2, 4, 8, 16)
MAX_MICRO_BATCH = 8


@dataclass
class Plan:
    overrides: dict  # dotted config key -> value
    cost: StepCost
    world: int
    limit: float  # bytes of GPU memory a plan may use

    @property
    def fits(self) -> bool:
        return self.cost.memory["total"] <= self.limit


def parse_tokens(text: str) -> int:
    """'1M' -> 1048576, '32K' / '32k' -> 32768, '4096' -> 4096 (K and M are powers of two, as in the papers)."""
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    text = text.strip().upper()
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except (ValueError, IndexError):
        raise ConfigError(f"cannot read {text!r} as a token count (e.g. 4096, 32K, 1M)") from None


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def parallel_choices(cfg: Config, sp: int) -> list[dict]:
    """The SP overrides worth trying at degree sp for the model's mixer families."""
    m = cfg.model
    mixers = layer_mixers(m)
    heads, kv = m.n_heads, m.n_kv_heads or m.n_heads
    has_linear = any(x in LINEAR_FAMILY for x in mixers)
    has_softmax = any(x not in LINEAR_FAMILY for x in mixers)
    if sp == 1:  # no SP: the algorithm keys stay as the config has them, ulysses_size must divide 1
        return [{"parallel.ulysses_size": 1, "parallel.layout": "contiguous"}]
    softmax = [{"parallel.softmax_sp": a, "parallel.ulysses_size": 1} for a in ("ring", "allgather")] \
        if has_softmax else [{"parallel.ulysses_size": 1}]
    if has_softmax:
        if heads % sp == 0 and kv % sp == 0:
            softmax.append({"parallel.softmax_sp": "ulysses", "parallel.ulysses_size": 1})
        softmax += [{"parallel.softmax_sp": "usp", "parallel.ulysses_size": u} for u in divisors(sp)
                    if 1 < u < sp and heads % u == 0 and kv % u == 0]
    linear = [{}]
    if has_linear:
        dv = m.d_model // m.n_heads
        linear = [{"parallel.linear_sp": "lasp1"}, {"parallel.linear_sp": "lasp2"}]
        linear += [{"parallel.linear_sp": "zeco", "parallel.zeco_blocks": k} for k in ZECO_BLOCKS if k <= dv]
        if heads % sp == 0:
            linear.append({"parallel.linear_sp": "ulysses"})
    return [{**s, **li, "parallel.layout": layout} for s in softmax for li in linear
            for layout in ("zigzag", "contiguous")]


def splits(cfg: Config, gpus: int, seq: int, global_batch: int):
    """(dp x sp and SP overrides, per-rank sequences) for every dp x sp split that divides the batch."""
    for sp in divisors(gpus):
        dp = gpus // sp
        if global_batch % dp == 0:
            for par in parallel_choices(cfg, sp):
                yield {"parallel.sp_size": sp, **par, "data.seq_len": seq}, global_batch // dp


def apply(cfg: Config, overrides: dict) -> Config | None:
    """cfg with the overrides, or None when the config's validation refuses them (e.g. N not divisible)."""
    out = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    try:
        validate(out)
    except ConfigError:
        return None
    return out


def search(cfg: Config, hw: Hardware, gpus: int, seq: int, global_batch: int, mask: Mask | None = None
           ) -> list[Plan]:
    """Every valid candidate with its predicted cost: those that fit, fastest first, then the rest by memory.

    Checkpointing and micro-batch never change validity, so they are set on each validated split in place.
    """
    limit = MEMORY_FRACTION * hw.memory
    plans = []
    for split, per_rank in splits(cfg, gpus, seq, global_batch):
        planned = apply(cfg, split)
        if planned is None:
            continue
        planned = OmegaConf.to_object(planned)  # plain dataclasses: the cost model reads them thousands of times
        for ckpt, ckpt_mode in CHECKPOINTING.values():
            for micro in [d for d in divisors(per_rank) if d <= MAX_MICRO_BATCH]:
                overrides = {**split, "data.batch_size": micro, "train.grad_accum": per_rank // micro,
                             "model.activation_checkpointing": ckpt, "model.checkpoint_mode": ckpt_mode}
                planned.data.batch_size, planned.train.grad_accum = micro, per_rank // micro
                planned.model.activation_checkpointing, planned.model.checkpoint_mode = ckpt, ckpt_mode
                plans.append(Plan(overrides, step_cost(planned, hw, gpus, mask), gpus, limit))
    if not plans:
        raise ConfigError(f"no dp x sp split of {gpus} GPUs divides the global batch of {global_batch} sequences "
                          f"and a sequence of {seq} tokens; change --gpus, --seq or --batch")
    return sorted(plans, key=lambda p: (not p.fits, p.cost.step_s if p.fits else p.cost.memory["total"]))


def distinct(plans: list[Plan]) -> list[Plan]:
    """The best plan of each (dp x sp, algorithms, checkpointing): ZeCO blocks, Ulysses size, layout and micro-batch
    are tuned within it."""
    seen, out = set(), []
    for plan in plans:
        o = plan.overrides
        key = (o["parallel.sp_size"], o.get("parallel.softmax_sp"), o.get("parallel.linear_sp"),
               o["model.activation_checkpointing"], o["model.checkpoint_mode"])
        if key not in seen:
            seen.add(key)
            out.append(plan)
    return out


def shortfall(plans: list[Plan]) -> str:
    """Why nothing fits: the smallest plan's memory against the limit and its largest component."""
    best = min(plans, key=lambda p: p.cost.memory["total"])
    mem = best.cost.memory
    parts = sorted(((v, k) for k, v in mem.items() if k != "total"), reverse=True)
    gb = 2 ** 30
    return (f"nothing fits: memory runs out first. The smallest plan needs {mem['total'] / gb:.1f} GB per GPU, "
            f"{(mem['total'] - best.limit) / gb:.1f} GB over the limit of {best.limit / gb:.1f} GB "
            f"({MEMORY_FRACTION:.0%} of the GPU); its largest part is {parts[0][1]} ({parts[0][0] / gb:.1f} GB). "
            f"Use more GPUs, a shorter sequence or a smaller model.")


def describe(plan: Plan) -> dict:
    """One table row."""
    o, c = plan.overrides, plan.cost
    sp = o["parallel.sp_size"]
    softmax = o.get("parallel.softmax_sp", "-") if sp > 1 else "-"
    if softmax == "usp":
        softmax = f"usp(U={o['parallel.ulysses_size']})"
    linear = o.get("parallel.linear_sp", "-") if sp > 1 else "-"
    if linear == "zeco":
        linear = f"zeco(K={o['parallel.zeco_blocks']})"
    ckpt = "off" if not o["model.activation_checkpointing"] else o["model.checkpoint_mode"]
    return {"dp x sp": f"{plan.world // sp} x {sp}", "softmax": softmax, "linear": linear,
            "layout": o["parallel.layout"], "ckpt": ckpt, "micro x accum": f"{o['data.batch_size']} x "
            f"{o['train.grad_accum']}", "step s": f"{c.step_s:.3g}", "tok/s": f"{c.tokens_per_s:,.0f}",
            "tok/s/GPU": f"{c.tokens_per_s / plan.world:,.0f}", "MFU": f"{c.mfu:.1%}",
            "mem GB": f"{c.memory['total'] / 2 ** 30:.1f}", "comm GB/step": f"{c.comm_bytes / 2 ** 30:.2f}"}


def print_plans(plans: list[Plan], top: int, title: str) -> None:
    """The best `top` plans as a rich table."""
    from rich.console import Console
    from rich.table import Table
    rows = [describe(p) for p in plans[:top]]
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)


def write_plan(cfg: Config, plan: Plan, path: str, command: str) -> None:
    """The whole config with the plan applied, with the overrides and the predicted cost in a header."""
    planned = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in plan.overrides.items()]))
    row = describe(plan)
    header = [f"# Written by: {command}", "# Plan overrides: " + " ".join(f"{k}={v}" for k, v in
                                                                         plan.overrides.items()),
              "# Predicted: " + ", ".join(f"{k} {row[k]}" for k in ("step s", "tok/s", "MFU", "mem GB"))]
    with open(path, "w") as f:
        f.write("\n".join(header) + "\n" + OmegaConf.to_yaml(planned))
