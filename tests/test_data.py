"""Data sources: MQAR/passkey answers sit where the loss mask says; streams pack documents; iteration resumes."""
import numpy as np
import pytest
import torch

from longtrain.config import DataConfig
from longtrain.launch.cli import main as cli
from longtrain.trainer.data import ByteTokenizer, DataLoader, mqar_sample, stream_segments


def test_mqar_answers_are_where_the_mask_says():
    rng = np.random.default_rng(0)
    tokens, mask = mqar_sample(rng, 64, 6, 40)
    keys, values = tokens[0:12:2], tokens[1:12:2]
    assert len(set(keys.tolist())) == 6 and (keys < 20).all() and (values >= 20).all()
    lookup = dict(zip(keys.tolist(), values.tolist()))
    inputs, targets = tokens[:-1], tokens[1:]
    assert mask.sum() == (64 + 1 - 12) // 2
    for t in np.flatnonzero(mask):
        assert lookup[int(inputs[t])] == targets[t]  # the target is the value bound to the queried key
    assert not mask[:12].any()
    for seed in range(5):  # every key id but 0 (padding) when all of [1, vocab/2) are drawn
        tokens, _ = mqar_sample(np.random.default_rng(seed), 64, 19, 40)
        assert sorted(tokens[0:38:2].tolist()) == list(range(1, 20))


def test_passkey_answer_is_the_hidden_key():
    loader = DataLoader(DataConfig(source="passkey", seq_len=200, batch_size=2))
    batch = loader.next_batch()
    tok = ByteTokenizer()
    for b in range(2):
        text = tok.decode(batch.tokens[b].tolist() + [batch.targets[b, -1].item()])
        key = text.split("The pass key is ")[1][:5]
        answer = tok.decode(batch.targets[b][batch.loss_mask[b]].tolist())
        assert answer == key and text.endswith(key)


def test_loader_is_deterministic_resumable_and_dp_disjoint():
    cfg = DataConfig(source="mqar", seq_len=32, batch_size=2, mqar_pairs=4, mqar_vocab=32)
    a = DataLoader(cfg)
    first, second = a.next_batch(), a.next_batch()
    b = DataLoader(cfg)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.next_batch().tokens, a.next_batch().tokens)
    dp0, dp1 = DataLoader(cfg, 0, 2), DataLoader(cfg, 1, 2)
    assert torch.equal(dp0.next_batch().tokens, first.tokens)
    assert torch.equal(dp1.next_batch().tokens, second.tokens)  # rank 1 takes the next samples
    assert not torch.equal(DataLoader(cfg, split="eval").next_batch().tokens, first.tokens)


def test_stream_segments_start_after_each_eos():
    window = np.array([5, 6, 256, 7, 256, 256, 8])
    assert stream_segments(window, 256).tolist() == [0, 0, 0, 1, 1, 2, 3]


def test_prepare_then_bin_source_packs_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello world")
    (docs / "b.txt").write_text("second document here")
    out = tmp_path / "data.bin"
    assert cli(["prepare", str(docs), str(out)]) == 0
    stream = np.fromfile(out, dtype=np.uint16)
    assert stream.tolist() == list(b"hello world") + [256] + list(b"second document here") + [256]
    loader = DataLoader(DataConfig(source="bin", path=str(out), seq_len=16, batch_size=1))
    batch = loader.next_batch()
    assert batch.tokens[0].tolist() == stream[:16].tolist()
    assert batch.segment_ids[0].tolist() == [0] * 12 + [1] * 4  # the token after EOS opens document 1
    text = DataLoader(DataConfig(source="text", path=str(docs), seq_len=16, batch_size=1)).next_batch()
    assert torch.equal(text.tokens, batch.tokens)


def test_stream_splits_into_disjoint_train_and_eval_windows(tmp_path):
    """160 tokens hold 19 windows of 8 (each needs seq_len + 1 tokens, its last target): train takes windows 0-17,
    eval the last tenth (window 18)."""
    path = tmp_path / "stream.bin"
    np.arange(20 * 8, dtype=np.uint16).tofile(path)
    cfg = DataConfig(source="bin", path=str(path), seq_len=8, batch_size=1, eos_id=9999)
    starts = {}
    for split in ("train", "eval"):
        loader = DataLoader(cfg, split=split)
        firsts = []
        for _ in range(20):
            batch = loader.next_batch()
            assert batch.tokens[0].tolist() == list(range(batch.tokens[0, 0], batch.tokens[0, 0] + 8))
            assert batch.targets[0].tolist() == list(range(batch.tokens[0, 0] + 1, batch.tokens[0, 0] + 9))
            firsts.append(int(batch.tokens[0, 0]))
        starts[split] = sorted(set(firsts))
    assert starts == {"train": [8 * w for w in range(18)], "eval": [8 * 18]}
    np.arange(8, dtype=np.uint16).tofile(path)  # seq_len tokens: one short of a window
    with pytest.raises(ValueError, match="holds 8 tokens, fewer than data.seq_len"):
        DataLoader(cfg)


def test_too_short_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.bin"
    np.arange(5, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match="fewer than data.seq_len"):
        DataLoader(DataConfig(source="bin", path=str(path), seq_len=16))


def test_local_tokenizer_json_is_used_for_text(tmp_path):
    """A tokenizers tokenizer.json from a local path: word-level ids, documents still end with eos_id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "second": 3, "document": 4, "[EOS]": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("hello world hello")
    (docs / "b.txt").write_text("second document unknown")
    cfg = DataConfig(source="text", path=str(docs), tokenizer=str(tmp_path / "tokenizer.json"), eos_id=5,
                     seq_len=7, batch_size=1)
    batch = DataLoader(cfg).next_batch()
    assert batch.tokens[0].tolist() == [1, 2, 1, 5, 3, 4, 0]
    assert batch.segment_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    out = tmp_path / "data.bin"
    assert cli(["prepare", str(docs), str(out), "--tokenizer", str(tmp_path / "tokenizer.json"), "--eos-id", "5"]) == 0
    assert np.fromfile(out, dtype=np.uint16).tolist() == [1, 2, 1, 5, 3, 4, 0, 5]


@pytest.mark.parametrize("vocab_size, dtype", [(65536, np.uint16), (65537, np.uint32)])
def test_prepare_writes_the_narrowest_dtype_that_holds_every_id(tmp_path, vocab_size, dtype):
    """Ids 0..65535 fit uint16 (the default data.bin_dtype); one id more needs uint32."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(f"w1 w{vocab_size - 1}")
    out = tmp_path / "data.bin"
    assert cli(["prepare", str(tmp_path / "a.txt"), str(out), "--tokenizer", str(tmp_path / "tokenizer.json"),
                "--eos-id", "0"]) == 0
    assert np.fromfile(out, dtype=dtype).tolist() == [1, vocab_size - 1, 0]
