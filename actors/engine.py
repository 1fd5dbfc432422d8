"""A thin host around one vLLM async engine.

:class:`VLLMEngineHost` is a plain class: tests and single-process tools use it directly, and
workflows turn it into a Ray actor with ``ray.remote(...)(VLLMEngineHost)`` where the actor is
created. vLLM is imported inside ``__init__`` so importing this module is cheap and needs no
vLLM (the GPU and CPU builds are different distributions).

Prompts are chat messages rendered with the model's own chat template into token ids here,
not inside vLLM, so the host can check the context length before a request is submitted and
so that identical prefixes (few-shot examples) give identical token ids for prefix caching.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

from actors.engine_config import EngineConfig
from actors.process_output import divert_output
from core.sampling import SamplingConfig, greedy


class PromptTooLongError(ValueError):
    """A prompt plus the requested new tokens does not fit the model's context."""


@dataclass(frozen=True)
class EngineOptions:
    """How to start one engine: the user's settings (``config``, the ``--tensor-parallel``, ...
    flags) and what belongs to this engine alone: its model, its seed, its role's vLLM
    arguments. :func:`engine_args` turns both into vLLM's engine arguments."""

    model: str
    config: EngineConfig = EngineConfig()
    seed: int = 0
    # a ModelSource (actors/model_source.py): where this node finds the model; None: ``model`` as is
    model_source: Any = None
    # How many engines the worker starts on the same GPUs: each gets an equal part of
    # config.gpu_memory_utilization (see gpu_memory_share).
    engines_per_worker: int = 1
    enable_prefix_caching: bool = True
    cpu_kv_cache_gib: int = 1
    max_logprobs: int = 20
    # "processed_logprobs": sampled tokens' log-probs after temperature (what PPO's learner
    # must reproduce); vLLM's default "raw_logprobs" is the model's own distribution (T = 1)
    logprobs_mode: str = "raw_logprobs"
    worker_extension_cls: str | None = None
    # any other AsyncEngineArgs field (never one engine_args sets itself)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engines_per_worker < 1:
            raise ValueError(f"EngineOptions.engines_per_worker must be at least 1, not {self.engines_per_worker}")

    @property
    def gpu_memory_share(self) -> float:
        """This engine's part of ``config.gpu_memory_utilization``: vLLM's ``gpu_memory_utilization``.

        Each vLLM engine checks at start that the GPU's free memory covers its whole share and
        then fills that share with KV cache (vllm/v1/worker/utils.py, ``request_memory``), so two
        engines on the same GPUs asking for 0.85 each cannot both start: each of the
        ``engines_per_worker`` gets an equal part instead. Equal, not by model size: both roles
        need a KV pool (the policy samples K long answers, the feedback model scores each pair
        under several principles), and an equal split needs no model shapes at start; ``cai plan``
        checks each engine against its part."""
        return self.config.gpu_memory_utilization / self.engines_per_worker


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Completion:
    """One sampled continuation. ``top_logprobs[i]`` holds the top candidates at step i, best
    first (keyed by id: several byte-level tokens can decode to the same text);
    ``token_logprobs[i]`` the log-prob of the token sampled at step i (when log-probs were asked)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    top_logprobs: tuple[tuple[TokenLogprob, ...], ...] = ()
    token_logprobs: tuple[float, ...] = ()


def resolve_dtype(dtype: str) -> str:
    """``auto`` means float32 on vLLM's CPU build: its bf16 path (0.32.0, on a Xeon with AMX)
    turned SmolLM2-135M's greedy "The capital of France is Paris." into French word salad,
    while float32 matched transformers. Elsewhere ``auto`` keeps vLLM's own choice."""
    from vllm.platforms import current_platform

    return "float32" if dtype == "auto" and current_platform.is_cpu() else dtype


# Keys engine_args() derives itself. ``extra`` may add any other AsyncEngineArgs field, but
# never one of these: a second value would either raise deep inside vLLM or silently win.
# The executor and the parallel sizes are reserved even where the fields do not set them:
# they fix how many GPU processes the engine starts, and the placement reserves exactly
# ``config.tensor_parallel`` GPUs per engine (workflows/runtime/placement.py).
RESERVED_ENGINE_KEYS = frozenset({"distributed_executor_backend", "pipeline_parallel_size", "data_parallel_size"})


def engine_args(options: EngineOptions, *, dtype: str) -> dict[str, Any]:
    """Keyword arguments for vLLM's ``AsyncEngineArgs``: pure, so tests need no vLLM or GPU.

    ``dtype`` is passed resolved (see :func:`resolve_dtype`, which needs vLLM). ``options.extra``
    adds fields; setting a key this function sets, or one of :data:`RESERVED_ENGINE_KEYS`,
    raises ``ValueError`` naming it instead of letting either value win.
    """
    config = options.config
    args: dict[str, Any] = {
        "model": options.model,
        "seed": options.seed,
        "max_model_len": config.max_model_len or None,  # None: the model's own
        "dtype": dtype,
        "tensor_parallel_size": config.tensor_parallel,
        "enable_prefix_caching": options.enable_prefix_caching,
        "gpu_memory_utilization": options.gpu_memory_share,
        "max_logprobs": options.max_logprobs,
        "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.enforce_eager,
        "trust_remote_code": config.trust_remote_code,
        "worker_extension_cls": options.worker_extension_cls or "",
        "logprobs_mode": options.logprobs_mode,
        "disable_log_stats": True,
    }
    if config.tensor_parallel > 1:
        # Left unset, vLLM picks its Ray executor whenever the actor sits in a placement group,
        # and that executor refuses a bundle with more than one GPU (ray_utils.initialize_ray_cluster).
        # "mp" starts the TP workers as child processes of this actor, on the GPUs Ray gave it
        # (CUDA_VISIBLE_DEVICES), so on one node. TP 1 stays unset: vLLM's single-process "uni".
        args["distributed_executor_backend"] = "mp"
    clashes = sorted((set(args) | RESERVED_ENGINE_KEYS) & set(options.extra))
    if clashes:
        raise ValueError(
            f"EngineOptions.extra sets {clashes}: these are chosen by EngineOptions' own fields "
            f"(the executor and parallel sizes from config.tensor_parallel); remove them from extra"
        )
    return {**args, **options.extra}


def engine_environment(options: EngineOptions, *, cpu: bool) -> dict[str, str]:
    """Environment variables vLLM reads at engine start (pure: tested without vLLM).

    * ``VLLM_CPU_KVCACHE_SPACE``: vLLM-CPU sizes its KV cache from it, not from
      ``gpu_memory_utilization``.
    * ``VLLM_LOGGING_LEVEL=WARNING``: per-step INFO lines drown the progress bar.
    * ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` on CPU at tensor parallel 1: vLLM-CPU otherwise runs
      the model in a third process beside the EngineCore (it switches the executor to ``mp``;
      vllm/platforms/cpu.py, 0.32). With it off the model runs inside the EngineCore, as on a
      GPU at TP 1: one torch + vLLM import less at start-up, and no per-step hand-off between
      two busy processes. Measured side by side (BENCHMARKS.md, "Engine process layout on
      CPU"): start-up 35 s instead of 52 s and 1.9x the tokens/s on this 2-core machine.
      ``AsyncLLM`` keeps its EngineCore process either way. TP > 1 keeps ``mp`` (one process
      per rank).
    """
    env = {"VLLM_CPU_KVCACHE_SPACE": str(options.cpu_kv_cache_gib), "VLLM_LOGGING_LEVEL": "WARNING"}
    if cpu and options.config.tensor_parallel == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


class VLLMEngineHost:
    """Owns one ``vllm.v1.engine.async_llm.AsyncLLM`` and the model's tokenizer."""

    def __init__(self, options: EngineOptions):
        self.output_log = divert_output("engine")  # vLLM's start-up noise: Ray logs, not the terminal
        if options.model_source is not None:  # the folder on this node (a staged copy, a checked path, a hub download)
            options = replace(options, model=options.model_source.local_path())
        self.options = options
        started = time.monotonic()
        from vllm.platforms import current_platform

        for name, value in engine_environment(options, cpu=current_platform.is_cpu()).items():
            os.environ.setdefault(name, value)  # what the user exported wins
        # Nothing more for tensor parallel > 1 (the "mp" executor, see engine_args): inside a Ray
        # actor vLLM itself starts its workers with spawn, not fork, and exports RAY_ADDRESS to them
        # (vllm/utils/system_utils.py, _maybe_force_spawn). Presetting VLLM_WORKER_MULTIPROC_METHOD
        # here would skip that export, and force spawn (a __main__ guard) on plain GPU scripts too.
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(
            options.model, trust_remote_code=options.config.trust_remote_code
        )
        args = AsyncEngineArgs(**engine_args(options, dtype=resolve_dtype(options.config.dtype)))
        self.engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = self.engine.model_config.max_model_len
        self.startup_seconds = time.monotonic() - started
        self._request_ids = itertools.count()

    def info(self) -> dict[str, Any]:
        """Identity and limits, for logs and for callers that plan prompt lengths."""
        return {
            "model": self.options.model,
            "max_model_len": self.max_model_len,
            "pid": os.getpid(),
            "hostname": os.uname().nodename,
            "startup_seconds": round(self.startup_seconds, 2),
            "output_log": str(self.output_log) if self.output_log else None,  # where vLLM's own output went
        }

    def running_requests(self) -> int:
        """Requests the engine holds now (running or waiting): batch occupancy when sampled."""
        return self.engine.get_num_unfinished_requests()

    def render(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True, continue_final: bool = False
    ) -> list[int]:
        """Token ids of a conversation under the model's chat template. With ``continue_final``
        the last (assistant) message is left open, so generation continues its text."""
        rendered = self.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=add_generation_prompt and not continue_final,
            continue_final_message=continue_final,
            tokenize=False,
        )
        return self.tokenize(rendered)

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if not prompt_ids:
            raise ValueError("empty prompt")
        if len(prompt_ids) + max_new_tokens > self.max_model_len:
            raise PromptTooLongError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )

    async def complete(
        self,
        prompt: list[dict[str, str]] | list[int],
        sampling: SamplingConfig,
        *,
        n: int = 1,
        logprobs: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        seed: int | None = None,
    ) -> list[Completion]:
        """Sample ``n`` continuations of a conversation (chat messages) or of raw token ids;
        ``seed`` gives the request its own random stream (the same seed samples the same
        answer, whatever else the engine runs beside it)."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt_ids = prompt if prompt and isinstance(prompt[0], int) else self.render(prompt)
        self.check_fits(prompt_ids, sampling.max_new_tokens)
        params = SamplingParams(
            n=n,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            logprobs=logprobs,
            stop=stop,
            ignore_eos=ignore_eos,
            repetition_penalty=sampling.repetition_penalty,
            seed=seed,
            # one output holding all n samples when the request finishes: no per-token streaming
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        request_id = f"cai-{os.getpid()}-{next(self._request_ids)}"
        final = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
            final = output
        return [self._completion(c, len(prompt_ids)) for c in final.outputs]

    def _completion(self, output, prompt_tokens: int) -> Completion:
        steps, sampled = [], []
        for token_id, step in zip(output.token_ids, output.logprobs or []):
            ranked = sorted(step.items(), key=lambda item: item[1].rank)
            steps.append(tuple(TokenLogprob(tid, entry.decoded_token or "", entry.logprob) for tid, entry in ranked))
            sampled.append(step[token_id].logprob)
        return Completion(
            text=output.text,
            token_ids=tuple(output.token_ids),
            finish_reason=output.finish_reason,
            prompt_tokens=prompt_tokens,
            top_logprobs=tuple(steps),
            token_logprobs=tuple(sampled),
        )

    async def next_token_logprobs(self, prompt: list[dict[str, str]] | list[int], k: int) -> tuple[TokenLogprob, ...]:
        """The top-``k`` next-token log-probs after the prompt: one engine step, greedy."""
        (completion,) = await self.complete(prompt, greedy(1), logprobs=k)
        return completion.top_logprobs[0]

    async def prompt_logprobs(self, prompt_ids: list[int]) -> list[float | None]:
        """Log-prob of each prompt token given the tokens before it (None for the first): exact
        scores for fixed continuations such as multiple-choice options."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.check_fits(prompt_ids, 1)
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        request_id = f"cai-{os.getpid()}-{next(self._request_ids)}"
        final = None
        async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
            final = output
        return [None if step is None else step[token].logprob for token, step in zip(prompt_ids, final.prompt_logprobs)]

    async def token_logprobs(self, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
        """Exact log-probs of ``token_ids`` as the next token after ``prompt_ids``, whatever
        their rank: one engine step per 128 ids (vLLM's ``logprob_token_ids``)."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import MAX_LOGPROB_TOKEN_IDS, RequestOutputKind

        self.check_fits(prompt_ids, 1)
        found: dict[int, float] = {}
        for start in range(0, len(token_ids), MAX_LOGPROB_TOKEN_IDS):
            chunk = list(token_ids[start:start + MAX_LOGPROB_TOKEN_IDS])
            params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=chunk,
                                    output_kind=RequestOutputKind.FINAL_ONLY)
            request_id = f"cai-{os.getpid()}-{next(self._request_ids)}"
            final = None
            async for output in self.engine.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, request_id):
                final = output
            found.update({tid: entry.logprob for tid, entry in final.outputs[0].logprobs[0].items()})
        return [found[tid] for tid in token_ids]

    def vocabulary_texts(self) -> list[tuple[int, str]]:
        """Every token id with its text as decoded alone (for finding a token's variants)."""
        return [(tid, self.tokenizer.decode([tid])) for tid in range(len(self.tokenizer))]

    async def continuation_logprob(self, prefix_ids: list[int], continuation_ids: list[int]) -> float:
        """Summed log-prob of ``continuation_ids`` right after ``prefix_ids``."""
        if not continuation_ids:
            raise ValueError("empty continuation")
        scores = await self.prompt_logprobs([*prefix_ids, *continuation_ids])
        return float(sum(scores[len(prefix_ids):]))

    def shutdown(self) -> None:
        """Stop the engine's processes: vLLM terminates the EngineCore, which stops its tensor-parallel
        workers. None of them is a Ray worker, so a bare ``ray.kill`` of the actor would leave them
        to Ray's reaping (workflows/runtime/engine_stop.py). Calling it twice is harmless."""
        self.engine.shutdown()
