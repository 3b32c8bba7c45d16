"""Structured configs (OmegaConf dataclasses): a YAML preset merged with CLI dotlist overrides."""
import difflib
from dataclasses import dataclass, field

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from longtrain.attention import LINEAR_FAMILY, MixerOptions, check_mixer
from longtrain.kernels import BACKENDS
from longtrain.parallel import LAYOUTS, LINEAR_SP, SOFTMAX_SP
from longtrain.parallel.sharding import num_chunks
from longtrain.parallel.ulysses import check_heads


@dataclass
class ModelConfig(MixerOptions):
    """The model; the mixer keys (n_kv_heads, window, feature_map, gate_rank, chunk_size, rope_base) come
    from MixerOptions and reach every mixer as they are."""
    vocab_size: int = 257
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    pattern: str = "gla*3,softmax"  # repeated to n_layers unless `layers` is given
    layers: list[str] | None = None
    mlp_hidden: int | None = None  # default: 8/3 d_model rounded up to a multiple of 32
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    checkpoint_mode: str = "block"  # block (recompute each block) | mixer (recompute only the token mixers)
    loss_chunk: int = 1024  # tokens per chunk of the head + loss (never the full logits); 0: full logits


@dataclass
class DataConfig:
    source: str = "mqar"  # mqar | passkey | bin | text
    seq_len: int = 256
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    path: str | None = None  # .bin file (bin) or a file/directory (text)
    bin_dtype: str = "uint16"
    eos_id: int = 256  # document separator in token streams
    tokenizer: str | None = None  # local tokenizer.json for text; byte-level when None
    mqar_pairs: int = 8
    mqar_vocab: int = 64
    passkey_digits: int = 5
    seed: int = 1234


@dataclass
class ParallelConfig:
    sp_size: int = 1
    softmax_sp: str = "ring"
    linear_sp: str = "lasp2"
    layout: str = "contiguous"
    zeco_blocks: int | None = None
    ulysses_size: int = 1
    pad: bool = False


@dataclass
class TrainConfig:
    steps: int = 100
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    engine: str = "fsdp"  # fsdp (FSDP2) | ddp | deepspeed
    zero_stage: int = 2  # DeepSpeed ZeRO stage (engine=deepspeed)
    log_every: int = 10
    eval_every: int = 50
    eval_batches: int = 4
    save_every: int = 0
    save_last: bool = True  # a checkpoint at the end and on a stop signal; false only for runs whose state is not kept
    keep_last: int = 2
    device: str = "auto"  # auto | cpu | cuda
    offload_activations: bool = False  # blocks' saved activations go to CPU memory (where not recomputed)
    profile_step: int = 0  # trace this step with torch.profiler into run.dir/profile/ (0: none)
    compile: bool = False  # torch.compile each block's norm + MLP; the mixers (SP communication) stay eager


@dataclass
class KernelsConfig:
    backend: str = "auto"  # auto | torch | triton (longtrain/kernels/__init__.py says what auto picks)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    resume: bool | str = True  # true: newest intact checkpoint | strict: newest or stop | false: start over
    stop_timeout: int = 300  # seconds from a stop signal to SIGKILL: one step plus one save must fit
    progress: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline | online | disabled
    project: str = "longtrain"
    entity: str | None = None
    name: str | None = None
    group: str | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


class ConfigError(ValueError):
    """A config problem, with the offending key named."""


def closest_key(full_key: str) -> str:
    """' (did you mean section.key?)' for an unknown dotted key, or ''."""
    schema = OmegaConf.structured(Config)
    parts = full_key.split(".")
    node, prefix = schema, []
    for part in parts[:-1]:
        if part not in node:
            break
        node, prefix = node[part], prefix + [part]
    candidates = list(node.keys()) if OmegaConf.is_dict(node) else []
    match = difflib.get_close_matches(parts[len(prefix)], candidates, n=1)
    return f" (did you mean {'.'.join(prefix + match)}?)" if match else f" (valid keys: {', '.join(candidates)})"


def load_config(path: str | None = None, overrides: list[str] | None = None, world: int | None = None) -> Config:
    """Schema <- YAML preset <- `key=value` overrides; unknown keys and bad types raise ConfigError. With `world`
    (the processes that will train it), a world size that parallel.sp_size does not divide is reported first."""
    cfg = OmegaConf.structured(Config)
    source = f"config file {path!r}"
    try:
        if path:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides or []:
            source = f"override {item!r}"
            if "=" not in item:
                raise ConfigError(f"{source} must look like key=value")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ConfigKeyError as e:
        raise ConfigError(f"unknown config key {e.full_key!r}{closest_key(e.full_key)}") from None
    except OmegaConfBaseException as e:  # its message goes on with lines of OmegaConf internals
        raise ConfigError(f"{source}: bad value: {(e.msg or str(e) or type(e).__name__).splitlines()[0]}") from None
    if world is not None:
        check_world(cfg, world)
    validate(cfg)
    return cfg


def layer_mixers(model: ModelConfig) -> list[str]:
    """Per-layer mixer names: `layers` if given, else `pattern` ("gla*3,softmax") repeated to n_layers."""
    if model.layers:
        names = list(model.layers)
        if len(names) != model.n_layers:
            raise ConfigError(f"model.layers has {len(names)} entries but model.n_layers={model.n_layers}")
    else:
        unit = []
        for item in model.pattern.replace(" ", "").split(","):
            name, _, count = item.partition("*")
            if not (count or "1").isdigit() or int(count or 1) < 1:
                raise ConfigError(f"model.pattern={model.pattern!r}: {item!r} is not mixer or mixer*count (count >= 1)")
            unit += [name] * int(count or 1)
        names = [unit[i % len(unit)] for i in range(model.n_layers)]
    for name in names:
        try:
            check_mixer(name)
        except ValueError as e:
            raise ConfigError(f"model.layers/pattern: {e}") from None
    return names


def choice(value, known, key: str) -> None:
    if value not in known:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, known))}")


def validate(cfg: Config) -> None:
    """Cross-field checks that the schema cannot express."""
    names = layer_mixers(cfg.model)
    choice(cfg.parallel.softmax_sp, [a for a in SOFTMAX_SP if a != "none"], "parallel.softmax_sp")
    choice(cfg.parallel.linear_sp, [a for a in LINEAR_SP if a != "none"], "parallel.linear_sp")
    choice(cfg.parallel.layout, LAYOUTS, "parallel.layout")
    choice(cfg.kernels.backend, BACKENDS, "kernels.backend")
    choice(cfg.data.source, ["mqar", "passkey", "bin", "text"], "data.source")
    choice(cfg.train.precision, ["auto", "bf16", "fp32"], "train.precision")
    choice(cfg.train.engine, ["fsdp", "ddp", "deepspeed"], "train.engine")
    choice(cfg.train.zero_stage, [0, 1, 2, 3], "train.zero_stage")
    choice(cfg.model.checkpoint_mode, ["block", "mixer"], "model.checkpoint_mode")
    choice(cfg.wandb.mode, ["offline", "online", "disabled"], "wandb.mode")
    if cfg.parallel.sp_size < 1:
        raise ConfigError(f"parallel.sp_size must be >= 1, got {cfg.parallel.sp_size}")
    if not 0 <= cfg.train.profile_step <= cfg.train.steps:
        raise ConfigError(f"train.profile_step must be in 0..train.steps={cfg.train.steps} (0: no trace), got "
                          f"{cfg.train.profile_step}")
    if cfg.parallel.zeco_blocks is not None and cfg.parallel.zeco_blocks < 1:
        raise ConfigError(f"parallel.zeco_blocks must be >= 1 (or null: 4), got {cfg.parallel.zeco_blocks}")
    choice(cfg.run.resume, [True, False, "strict"], "run.resume")
    for key in ("train.lr", "train.steps", "train.grad_accum", "train.log_every", "data.seq_len", "data.batch_size",
                "run.stop_timeout", "model.d_model", "model.n_heads", "model.n_layers"):
        if OmegaConf.select(cfg, key) <= 0:
            raise ConfigError(f"{key} must be > 0, got {OmegaConf.select(cfg, key)}")
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} must divide by model.n_heads={m.n_heads}")
    if m.n_kv_heads is not None and (m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads):
        raise ConfigError(f"model.n_heads={m.n_heads} must divide by model.n_kv_heads={m.n_kv_heads}")
    parts = num_chunks(cfg.parallel.sp_size, cfg.parallel.layout)
    if cfg.data.seq_len % parts and not cfg.parallel.pad:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} does not split into {parts} equal chunks "
                          f"(parallel.sp_size={cfg.parallel.sp_size}, {cfg.parallel.layout}); "
                          f"set parallel.pad=true or a multiple of {parts}")
    if cfg.parallel.sp_size % cfg.parallel.ulysses_size:
        raise ConfigError(f"parallel.ulysses_size={cfg.parallel.ulysses_size} must divide "
                          f"parallel.sp_size={cfg.parallel.sp_size}")
    check_ulysses_heads(cfg, names)
    if "window" in names and not cfg.model.window:
        raise ConfigError("mixer 'window' needs model.window > 0")
    if cfg.train.compile and cfg.train.engine == "deepspeed" and cfg.train.zero_stage == 3:
        raise ConfigError("train.compile=true does not work with DeepSpeed ZeRO-3 (its parameter hooks break the "
                          "compiled graph): use train.engine=fsdp, which shards parameters too, or zero_stage<=2")
    if cfg.data.source in ("bin", "text") and not cfg.data.path:
        raise ConfigError(f"data.source={cfg.data.source!r} needs data.path")


def check_ulysses_heads(cfg: Config, names: list[str]) -> None:
    """Ulysses splits heads over its degree: every layer it runs must have heads that divide evenly."""
    sp, par, m = cfg.parallel.sp_size, cfg.parallel, cfg.model
    degree = {"ulysses": sp, "usp": par.ulysses_size}.get(par.softmax_sp, 1) if sp > 1 else 1
    try:
        if degree > 1 and any(name not in LINEAR_FAMILY for name in names):
            check_heads(m.n_heads, m.n_kv_heads or m.n_heads, degree)
        if sp > 1 and par.linear_sp == "ulysses" and any(name in LINEAR_FAMILY for name in names):
            check_heads(m.n_heads, m.n_heads, sp)
    except ValueError as e:
        raise ConfigError(f"parallel.softmax_sp={par.softmax_sp}, parallel.linear_sp={par.linear_sp}: {e}") from None


def check_world(cfg: Config, world: int) -> None:
    """The world size must be dp x parallel.sp_size for a whole dp >= 1."""
    sp = cfg.parallel.sp_size
    if world % sp:
        hint = f": start it with `longtrain launch --nproc {sp}`, or set parallel.sp_size=1" if world == 1 else ""
        raise ConfigError(f"parallel.sp_size={sp} does not divide the world size {world}{hint}")
