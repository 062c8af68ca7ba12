"""Row keys as S32 digest arrays, and the stages that stream them: tokenize in row groups, embed one group at a time.

The stage test runs against the real store (SeaweedFS) with the tiny random encoder.
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptflow import stages
from adaptflow.cache import text_sha256
from adaptflow.config import build_config
from adaptflow.row_keys import digests_of_hex, first_seen, hex_column, is_member, text_digests
from adaptflow.store import ArtifactStore, parse_s3_uri

TEXTS = ["a", "b", "a", "çà va", "", "b", "日本語", "x" * 300]


def test_digests_are_the_cache_keys_and_round_trip_through_hex():
    digests = text_digests(TEXTS)
    assert digests.dtype == np.dtype("S32") and len(digests) == len(TEXTS)
    column = hex_column(digests)
    assert column.to_pylist() == [text_sha256(t) for t in TEXTS]
    assert (digests_of_hex(column) == digests).all()
    assert (digests_of_hex(column.slice(2, 4)) == digests[2:6]).all()  # a sliced column keeps its offsets
    assert (text_digests(pa.array(TEXTS)) == digests).all()
    assert (text_digests(pd.Series(TEXTS, dtype=pd.ArrowDtype(pa.string()))) == digests).all()
    assert len(text_digests([])) == 0 and len(digests_of_hex(pa.chunked_array([], pa.string()))) == 0


def test_chunking_does_not_change_the_digests(monkeypatch):
    import adaptflow.row_keys

    texts = [f"row {i}" for i in range(50)]
    whole = text_digests(texts)
    monkeypatch.setattr(adaptflow.row_keys, "CHUNK", 7)
    assert (text_digests(texts) == whole).all()
    assert (text_digests(pa.array(texts)) == whole).all()
    assert hex_column(whole).to_pylist() == [text_sha256(t) for t in texts]


def test_first_seen_is_dict_fromkeys_order_and_membership():
    digests = text_digests(TEXTS)
    assert [TEXTS[i] for i in first_seen(digests)] == list(dict.fromkeys(TEXTS))
    member = is_member(digests, text_digests(["b", "日本語"]))
    assert member.tolist() == [t in ("b", "日本語") for t in TEXTS]
    assert not is_member(digests, text_digests([])).any()


@pytest.mark.parametrize("bad", [["ab"], ["g" * 64], [None]])
def test_a_bad_hex_key_is_refused(bad):
    with pytest.raises(ValueError, match="64 hex"):
        digests_of_hex(pa.array(bad, pa.string()))


WORDS = "good bad great awful boring funny warm cold love hate story plot actor music fun dull".split()


@pytest.fixture
def ctx(test_settings, fresh_bucket) -> stages.StageContext:
    settings = test_settings.model_copy(update={"bucket": fresh_bucket})
    return stages.StageContext(settings, ArtifactStore.from_settings(settings))


def test_tokens_are_written_in_row_groups_and_embedded_one_group_at_a_time(ctx, tmp_path, tiny_encoder_path,
                                                                           monkeypatch):
    from adaptflow.embed import encode, TokenIds
    from adaptflow.encoders import load_encoder, resolve_encoder

    rng = np.random.default_rng(0)
    texts = [f"{' '.join(rng.choice(WORDS, size=int(rng.integers(2, 9))))} {i}" for i in range(160)]
    texts += texts[:10]  # repeated texts: one tokens row each
    path = tmp_path / "train.csv"
    pd.DataFrame({"text": texts, "label": rng.choice(["pos", "neg"], size=len(texts))}).to_csv(path, index=False)
    config = build_config({"name": "row-groups", "data": {"train": str(path)},
                           "encoder": {"ref": str(tiny_encoder_path), "max_length": 32, "device": "cpu",
                                       "dtype": "fp32", "tokens_per_batch": 256},
                           "head": {"epochs": 3}, "gate": {"smoke_test": False}})
    monkeypatch.setattr(stages, "TOKENS_ROW_GROUP", 50)
    encoder = stages.resolve_encoder_stage(ctx, config)
    validated = stages.validate_stage(ctx, config, stages.ingest_stage(ctx, config))
    tokens = stages.tokenize_stage(ctx, config, validated, encoder)
    local = ctx.store.get_verified_file(parse_s3_uri(tokens["tokens"])[1], tmp_path / "tokens.parquet")
    tokens_file = pq.ParquetFile(local)
    distinct = validated["rows"]["train"] + validated["rows"]["test"]
    assert tokens["rows"] == distinct == tokens_file.metadata.num_rows
    assert tokens_file.num_row_groups == -(-distinct // 50)

    # a third of the rows cached beforehand: each group encodes only what the cache lacks
    cache = stages.embed_cache(ctx, config, encoder)
    table = tokens_file.read()
    keys = digests_of_hex(table.column("text_sha256"))
    some = np.arange(0, distinct, 3)
    stages.encode_into_cache(ctx, cache, [(keys[some], TokenIds.from_arrow(table.column("ids")).take(some))],
                             encoder_ref=encoder["ref"], device="cpu")
    first = stages.embed_stage(ctx, config, tokens, encoder)
    assert (first["encoded"], first["cached"]) == (distinct - len(some), len(some))
    again = stages.embed_stage(ctx, config, tokens, encoder)
    assert (again["encoded"], again["tokens_per_s"]) == (0, None)

    # every row's vector is what one encode of all the ids gives (windows change the batches, not the vectors)
    _, model = load_encoder(resolve_encoder(str(tiny_encoder_path)))
    expected = encode(model, TokenIds.from_arrow(table.column("ids")), pooling="mean", dtype="fp32", progress=False)
    got = stages.embed_cache(ctx, config, encoder).read(keys)
    np.testing.assert_allclose(got, expected.vectors, atol=1e-6)
