"""The vLLM CPU engine inside a real Ray actor, serving the tiny model."""

import math

import pytest
import ray

from actors.engine import PromptTooLongError
from core.sampling import SamplingConfig, greedy


def test_engine_actor_returns_text_and_top_k_logprobs(tiny_engine):
    info = ray.get(tiny_engine.info.remote())
    assert info["max_model_len"] == 1024
    completions = ray.get(
        tiny_engine.complete.remote(
            [{"role": "user", "content": "Is it honest?"}], greedy(12), logprobs=3, n=1
        )
    )
    (completion,) = completions
    assert completion.text and len(completion.token_ids) == 12
    assert completion.finish_reason == "length"
    assert len(completion.top_logprobs) == 12
    for step in completion.top_logprobs:
        assert 1 <= len(step) <= 4  # top-3 plus the sampled token when it is not among them
        assert all(c.logprob <= 0 for c in step)
    # greedy decoding picks the most likely token at every step
    assert completion.token_ids[0] == completion.top_logprobs[0][0].token_id


def test_next_token_logprobs_form_a_distribution(tiny_engine):
    top = ray.get(tiny_engine.next_token_logprobs.remote([{"role": "user", "content": "Answer A or B"}], 20))
    assert len(top) >= 20
    assert len({t.token_id for t in top}) == len(top)
    mass = sum(math.exp(t.logprob) for t in top)
    assert 0 < mass <= 1.0 + 1e-4


def test_exact_next_token_logprobs_of_any_ids_match_the_top_k_and_the_prompt_logprobs(tiny_engine):
    prompt = [1, 40, 41, 42, 43]
    top = ray.get(tiny_engine.next_token_logprobs.remote(prompt, 5))
    unlikely = [7, 99, 300]  # whatever their rank
    exact = ray.get(tiny_engine.token_logprobs.remote(prompt, [t.token_id for t in top[:3]] + unlikely))
    assert exact[:3] == pytest.approx([t.logprob for t in top[:3]], abs=1e-5)
    for token_id, logprob in zip(unlikely, exact[3:]):
        scored = ray.get(tiny_engine.continuation_logprob.remote(prompt, [token_id]))
        assert logprob == pytest.approx(scored, abs=1e-4)


def test_sampling_n_and_raw_token_prompts(tiny_engine):
    completions = ray.get(tiny_engine.complete.remote([1, 40, 41, 42], SamplingConfig(max_new_tokens=5), n=3))
    assert len(completions) == 3 and all(c.prompt_tokens == 4 for c in completions)


def test_overlong_prompt_is_refused_with_a_clear_error(tiny_engine):
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 1024 tokens"):
        ray.get(tiny_engine.complete.remote([{"role": "user", "content": "word " * 2000}], greedy(8)))


def test_vllm_output_goes_to_the_ray_logs_not_the_terminal(tiny_engine, monkeypatch):
    """The engine actor's own stdout/stderr (vLLM's start-up warnings and progress bars) went to
    cai-engine-<pid>.log beside Ray's worker logs, not to worker-*.out (streamed to the driver)."""
    from pathlib import Path

    from actors.process_output import LOG_LEVEL_ENV, worker_log_file

    info = ray.get(tiny_engine.info.remote())
    log = Path(info["output_log"])
    assert log.name == f"cai-engine-{info['pid']}.log" and log.parent.name == "logs"
    text = log.read_text()
    assert "WARNING" in text or "Loading" in text, text[-2000:]  # vLLM's own lines
    streamed = [p for p in log.parent.glob(f"worker-*-{info['pid']}.*") if p.suffix in (".out", ".err")]
    assert streamed and not any("Loading safetensors" in p.read_text() for p in streamed)
    # outside a Ray worker (this test process) and when verbose, nothing is diverted
    assert worker_log_file("engine") is None
    monkeypatch.setenv(LOG_LEVEL_ENV, "debug")
    assert worker_log_file("engine") is None
