"""Encoding: dtype choice, tokenization, token-budget batches, pooling, order, and the real MiniLM in bf16."""

import logging

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adaptflow import embed
from adaptflow.embed import encode, iter_encode, resolve_dtype, token_budget_batches, tokenize_texts

SENTENCES = [
    "a good film", "the worst movie", "great acting but a dull plot and a boring story that was not fun",
    "love it", "hate", "the cast and the director and the music were the best of the story", "awful",
    "funny warm film", "it is a movie", "bad bad bad bad bad", "the scene was cold", "fun",
]


@pytest.fixture(scope="module")
def tiny(tiny_encoder_path):
    return AutoTokenizer.from_pretrained(tiny_encoder_path), AutoModel.from_pretrained(tiny_encoder_path).eval()


def one_by_one(model, ids, pooling):
    """Reference: each row alone, no padding at all."""
    with torch.no_grad():
        out = [model(input_ids=torch.tensor([row])).last_hidden_state[0] for row in ids]
    return np.stack([(h.mean(0) if pooling == "mean" else h[0]).numpy() for h in out])


def test_resolve_dtype(monkeypatch):
    assert resolve_dtype("fp32", "cuda") == "fp32" and resolve_dtype("bf16", "cpu") == "bf16"
    assert resolve_dtype("auto", "cuda") == "bf16" and resolve_dtype("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(embed, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bf16"
    monkeypatch.setattr(embed, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="'auto', 'fp32', 'bf16'"):
        resolve_dtype("fp16", "cpu")
    assert isinstance(embed.cpu_has_native_bf16(), bool) and embed.physical_cores() >= 1


def test_tokenize_truncates_without_padding(tiny):
    tok, _ = tiny
    ids = tokenize_texts(tok, SENTENCES, max_length=8, batch_size=5)  # several tokenizer batches
    assert len(ids) == len(SENTENCES) and all(isinstance(x, list) for x in ids)
    assert max(map(len, ids)) == 8 and min(map(len, ids)) < 8  # truncated, and not padded
    assert ids == [tok(s, truncation=True, max_length=8)["input_ids"] for s in SENTENCES]
    assert ids[0][0] == tok.cls_token_id and ids[2][-1] == tok.sep_token_id  # truncation keeps [SEP]


def test_token_budget_batches():
    lengths = np.array([3, 50, 7, 7, 120, 1, 30, 30, 30, 2])
    batches = token_budget_batches(lengths, tokens_per_batch=64)
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    for b in batches:
        assert len(b) == 1 or len(b) * lengths[b].max() <= 64  # a row over budget goes alone
    firsts = [lengths[b].max() for b in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest first: the memory peak comes at once


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encode_matches_unpadded_rows_in_input_order(tiny, pooling):
    tok, model = tiny
    ids = tokenize_texts(tok, SENTENCES, max_length=32)
    result = encode(model, ids, pooling=pooling, dtype="fp32", tokens_per_batch=40, progress=False)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (len(ids), 32)
    # dynamic padding + mask must not change any vector, and sorting must not change the order
    np.testing.assert_allclose(result.vectors, one_by_one(model, ids, pooling), atol=1e-5)
    assert result.tokens == sum(map(len, ids)) and result.tokens_per_second > 0


def test_iter_encode_chunks_and_leaves_the_caller_alone(tiny, caplog):
    tok, model = tiny
    ids = tokenize_texts(tok, SENTENCES * 5, max_length=32)
    seen = []
    with caplog.at_level(logging.INFO, logger="adaptflow.embed"):
        for idx, vectors in iter_encode(model, ids, dtype="bf16", tokens_per_batch=64, chunk_rows=16,
                                        progress=False):
            # between chunks the caller runs normal code: no inference mode, no autocast leaking out
            assert not torch.is_inference_mode_enabled() and not torch.is_autocast_enabled("cpu")
            assert vectors.dtype == np.float32 and len(idx) == len(vectors)
            seen.append(idx)
    assert all(len(c) >= 16 for c in seen[:-1]) and len(seen) > 2
    assert sorted(np.concatenate(seen).tolist()) == list(range(len(ids)))
    assert "rows/s" in caplog.text and "tokens/s" in caplog.text


def test_encode_empty_and_bad_arguments(tiny):
    _, model = tiny
    assert encode(model, [], progress=False).vectors.shape == (0, 32)
    with pytest.raises(ValueError, match="pooling"):
        encode(model, [[2, 3]], pooling="max")
    with pytest.raises(ValueError, match="resolve_dtype"):
        encode(model, [[2, 3]], dtype="auto")


def test_real_minilm_bf16_and_sentence_transformers_pooling(minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    assert model.config._attn_implementation == "sdpa"
    texts = [f"{s} {'and so on ' * (i % 5)}".strip() for i, s in enumerate(SENTENCES * 3)]  # 36, varied lengths
    ids = tokenize_texts(tok, texts, max_length=64)
    fp32 = encode(model, ids, dtype="fp32", tokens_per_batch=256, progress=False).vectors
    bf16 = encode(model, ids, dtype="bf16", tokens_per_batch=256, progress=False).vectors
    # sentence-transformers' recipe in input order: pad the whole batch, masked mean of last_hidden_state
    batch = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy()
    np.testing.assert_allclose(fp32, manual, atol=2e-5)
    cos = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cos.min() >= 0.999, cos.min()
