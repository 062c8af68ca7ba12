from transformers import AutoModel, AutoTokenizer


def test_tiny_encoder_loads_offline(tiny_encoder_path):
    tok = AutoTokenizer.from_pretrained(tiny_encoder_path)
    model = AutoModel.from_pretrained(tiny_encoder_path)
    ids = tok(["a good film"], return_tensors="pt")
    out = model(**ids).last_hidden_state
    assert out.shape[-1] == 32
    assert (tiny_encoder_path / "model.safetensors").is_file()
