"""The fast encode path: ragged token ids, parallel CPU workers, the cached bf16 copy, the allocator setting."""

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from adaptflow import embed
from adaptflow.embed import TokenIds, encode, forward_fn, iter_encode, iter_tokenize, tokenize_ragged, tokenize_texts

TEXTS = [f"{w} film {'and a good story ' * (i % 7)}".strip() for i, w in enumerate(["good", "bad", "fun", "dull"] * 30)]


@pytest.fixture(scope="module")
def tiny(tiny_encoder_path):
    return AutoTokenizer.from_pretrained(tiny_encoder_path), AutoModel.from_pretrained(tiny_encoder_path).eval()


def test_ragged_tokenization_equals_lists(tiny):
    tok, _ = tiny
    lists = tokenize_texts(tok, TEXTS, max_length=16)
    ragged = tokenize_ragged(tok, TEXTS, max_length=16, batch_size=7)  # several batches
    assert ragged.values.dtype == np.int32 and len(ragged) == len(TEXTS)
    assert [r.tolist() for r in ragged] == lists
    assert ragged == TokenIds.from_lists(lists)
    assert sum(len(b) for b in iter_tokenize(tok, iter(TEXTS), 16, batch_size=50)) == len(TEXTS)
    assert len(tokenize_ragged(tok, [], 16)) == 0


def test_token_ids_take_slice_and_arrow_round_trip():
    ids = TokenIds.from_lists([[1, 2, 3], [4], [], [5, 6]])
    assert ids.lengths.tolist() == [3, 1, 0, 2] and ids[-1].tolist() == [5, 6]
    assert [r.tolist() for r in ids.take([3, 0, 2])] == [[5, 6], [1, 2, 3], []]
    assert [r.tolist() for r in ids[1:3]] == [[4], []]
    arrow = ids.to_arrow()
    assert arrow.to_pylist() == [[1, 2, 3], [4], [], [5, 6]]
    assert TokenIds.from_arrow(arrow) == ids
    assert TokenIds.from_arrow(pa.chunked_array([arrow.slice(1, 2), arrow.slice(3, 1)])).lengths.tolist() == [1, 0, 2]
    with pytest.raises(ValueError, match="offsets"):
        TokenIds(np.array([1, 2]), np.array([0, 1]))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_workers_and_ragged_input_give_the_same_vectors(tiny, dtype):
    tok, model = tiny
    lists = tokenize_texts(tok, TEXTS, max_length=32)
    one = encode(model, lists, dtype=dtype, tokens_per_batch=64, workers=1, progress=False).vectors
    stats = {}
    many = np.zeros_like(one)
    for idx, vec in iter_encode(model, TokenIds.from_lists(lists), dtype=dtype, tokens_per_batch=64, workers=2,
                                chunk_rows=16, progress=False, stats=stats):
        assert not torch.is_inference_mode_enabled()
        many[idx] = vec
    assert stats["workers"] == 2
    np.testing.assert_allclose(many, one, atol=1e-6)
    assert torch.get_num_threads() == embed.physical_cores()  # the workers' thread setting did not leak


def test_stopping_early_stops_the_workers(tiny):
    tok, model = tiny
    ids = tokenize_ragged(tok, TEXTS * 4, max_length=32)
    gen = iter_encode(model, ids, tokens_per_batch=64, chunk_rows=8, workers=2, progress=False)
    next(gen)
    gen.close()  # must return promptly and leave no worker behind
    import threading

    assert not [t for t in threading.enumerate() if t.name.startswith("adaptflow-encode")]


def test_bf16_copy_is_cached_and_leaves_the_model_alone(tiny):
    _, model = tiny
    f1, f2 = forward_fn(model, "bf16"), forward_fn(model, "bf16")
    assert f1 is f2 and next(model.parameters()).dtype == torch.float32
    assert next(f1.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        next(model.parameters()).add_(0.0)  # an in-place change of the weights invalidates the copy
    assert forward_fn(model, "bf16") is not f1
    assert forward_fn(model, "fp32").model is model


def test_allocator_setting_is_harmless():
    assert isinstance(embed.keep_freed_buffers_in_heap(), bool)
    assert embed.cpu_workers(1) == 1 and embed.cpu_workers(100, 3) == 3 and embed.cpu_workers(5, 3) == 1
