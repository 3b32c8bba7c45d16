"""Data: byte tokenizer, synthetic MQAR and passkey, token streams (.bin memmap, text) packed with segment_ids.

Every sample is a pure function of (seed, split, index), so iteration is deterministic and resumable
from one integer. The loader yields full sequences; sequence parallelism picks each rank's slice later.
"""
import glob
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from longtrain.config import ConfigError, DataConfig

SPLITS = {"train": 0, "eval": 1}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; 256 is the end-of-document token."""
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json from a local path (install the `tokenizers` package to use it)."""

    def __init__(self, path: str, eos_id: int) -> None:
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_id = eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(cfg: DataConfig):
    return HFTokenizer(cfg.tokenizer, cfg.eos_id) if cfg.tokenizer else ByteTokenizer()


@dataclass
class Batch:
    """tokens/targets [B, N] int64; loss_mask [B, N] bool (which targets count); segment_ids [B, N] int64
    for packed documents, None when every sequence is one document."""
    tokens: Tensor
    targets: Tensor
    loss_mask: Tensor
    segment_ids: Tensor | None

    def to(self, device) -> "Batch":
        return Batch(*(None if t is None else t.to(device, non_blocking=True)
                       for t in (self.tokens, self.targets, self.loss_mask, self.segment_ids)))


def mqar_sample(rng: np.random.Generator, seq_len: int, n_pairs: int, vocab: int):
    """Multi-query associative recall (Zoology): key-value pairs, then queried keys whose next token is the value.

    Keys come from [1, vocab/2), values from [vocab/2, vocab). Returns (tokens [N+1], loss_mask [N]):
    the mask marks exactly the positions whose input is a queried key and whose target is its value.
    """
    half = vocab // 2
    if n_pairs > half - 1 or 2 * n_pairs + 2 > seq_len:
        raise ValueError(f"mqar: data.mqar_pairs={n_pairs} do not fit data.mqar_vocab={vocab} (at most vocab/2 - 1) "
                         f"and data.seq_len={seq_len} (at least 2 * pairs + 2)")
    keys = rng.choice(np.arange(1, half), n_pairs, replace=False)
    values = rng.integers(half, vocab, n_pairs)
    tokens = np.zeros(seq_len + 1, dtype=np.int64)
    tokens[0:2 * n_pairs:2], tokens[1:2 * n_pairs:2] = keys, values
    n_queries = (seq_len + 1 - 2 * n_pairs) // 2
    picks = rng.integers(0, n_pairs, n_queries)
    q0 = 2 * n_pairs
    tokens[q0:q0 + 2 * n_queries:2], tokens[q0 + 1:q0 + 2 * n_queries:2] = keys[picks], values[picks]
    mask = np.zeros(seq_len, dtype=bool)
    mask[q0:q0 + 2 * n_queries:2] = True
    return tokens, mask


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_sample(rng: np.random.Generator, seq_len: int, digits: int, tok: ByteTokenizer):
    """Passkey retrieval: a number hidden at a random depth in filler text, asked for at the end."""
    key = "".join(str(d) for d in rng.integers(0, 10, digits))
    needle = tok.encode(f"The pass key is {key}. Remember it. ")
    question = tok.encode("What is the pass key? The pass key is ")
    answer = tok.encode(key)
    n_filler = seq_len + 1 - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"passkey: data.seq_len={seq_len} is too short for the needle and question "
                         f"(at least {seq_len + 1 - n_filler} tokens)")
    filler = (tok.encode(FILLER) * (n_filler // len(FILLER) + 1))[:n_filler]
    depth = int(rng.integers(0, n_filler + 1))
    tokens = np.array(filler[:depth] + needle + filler[depth:] + question + answer, dtype=np.int64)
    mask = np.zeros(seq_len, dtype=bool)
    mask[seq_len - len(answer):] = True
    return tokens, mask


def stream_segments(window: np.ndarray, eos_id: int) -> np.ndarray:
    """Document ids of a token window: a new document starts after every end-of-document token."""
    is_eos = window == eos_id
    return np.concatenate([[0], np.cumsum(is_eos[:-1])])


def text_files(path: str) -> list[str]:
    if os.path.isdir(path):
        return sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p))
    return [path]


def tokenize_files(path: str, tok) -> np.ndarray:
    """All documents under `path`, each followed by the end-of-document token, as one stream."""
    ids = []
    for name in text_files(path):
        with open(name, encoding="utf-8", errors="replace") as f:
            ids += tok.encode(f.read()) + [tok.eos_id]
    return np.array(ids, dtype=np.int64)


def prepare(path: str, out_path: str, tokenizer: str | None = None, eos_id: int = 256) -> np.ndarray:
    """Tokenize text files into a flat .bin token stream (uint16 when the vocabulary fits, else uint32)."""
    tok = HFTokenizer(tokenizer, eos_id) if tokenizer else ByteTokenizer()
    stream = tokenize_files(path, tok)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    stream.astype(dtype).tofile(out_path)
    return stream


class DataLoader:
    """Micro-batches of full sequences for one data-parallel rank; `position` counts samples consumed globally."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, split: str = "train") -> None:
        self.cfg, self.dp_rank, self.dp_size, self.split = cfg, dp_rank, dp_size, split
        self.position = 0
        self.tok = load_tokenizer(cfg)
        self.stream = None
        if cfg.source == "bin":
            self.stream = np.memmap(cfg.path, dtype=np.dtype(cfg.bin_dtype), mode="r")
        elif cfg.source == "text":
            self.stream = tokenize_files(cfg.path, self.tok)
        if self.stream is not None:
            n_windows = (len(self.stream) - 1) // cfg.seq_len
            if n_windows < 1:
                raise ConfigError(f"data.path {cfg.path!r} holds {len(self.stream)} tokens, fewer than "
                                 f"data.seq_len+1 = {cfg.seq_len + 1}")
            n_eval = n_windows // 10
            self.windows = range(n_windows - n_eval) if split == "train" or n_eval == 0 else \
                range(n_windows - n_eval, n_windows)

    def sample(self, index: int):
        """(tokens [N+1], loss_mask [N], segment_ids [N] or None) of global sample `index`."""
        cfg = self.cfg
        if self.stream is not None:
            start = self.windows[index % len(self.windows)] * cfg.seq_len
            window = np.asarray(self.stream[start:start + cfg.seq_len + 1], dtype=np.int64)
            return window, np.ones(cfg.seq_len, dtype=bool), stream_segments(window[:-1], cfg.eos_id)
        rng = np.random.default_rng([cfg.seed, SPLITS[self.split], index])
        if cfg.source == "mqar":
            tokens, mask = mqar_sample(rng, cfg.seq_len, cfg.mqar_pairs, cfg.mqar_vocab)
        else:
            tokens, mask = passkey_sample(rng, cfg.seq_len, cfg.passkey_digits, self.tok)
        return tokens, mask, None  # one document per sequence

    def next_batch(self) -> Batch:
        B = self.cfg.batch_size
        first = self.position + self.dp_rank * B
        samples = [self.sample(first + i) for i in range(B)]
        self.position += self.dp_size * B
        tokens = torch.from_numpy(np.stack([s[0] for s in samples]))
        segment_ids = None if self.stream is None else torch.from_numpy(np.stack([s[2] for s in samples]))
        return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                     torch.from_numpy(np.stack([s[1] for s in samples])), segment_ids)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
