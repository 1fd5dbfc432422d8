"""How an engine samples: one frozen config shared by generate, label, eval compare and PPO
rollouts, and handed to the actors as itself (:meth:`actors.engine.VLLMEngineHost.complete`)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import failing, option


@dataclass(frozen=True)
class SamplingConfig:
    """vLLM sampling settings. Jobs nest it with their own defaults (PPO: 64 new tokens)."""

    max_new_tokens: int = option(256, "token limit for each sampled answer (and each critique and revision)",
                                 identity=True)
    temperature: float = option(1.0, "sampling temperature (0 = greedy)", identity=True)
    top_p: float = option(1.0, "nucleus sampling probability", identity=True)
    repetition_penalty: float = option(1.0, "vLLM repetition penalty (>1 discourages repeats; small models loop)",
                                       identity=True)

    def problems(self) -> list[str]:
        checks = {"max_new_tokens": self.max_new_tokens >= 1, "temperature": self.temperature >= 0,
                  "top_p": 0 < self.top_p <= 1, "repetition_penalty": self.repetition_penalty > 0}
        return failing(checks)


def greedy(max_new_tokens: int) -> SamplingConfig:
    """The most likely continuation, up to ``max_new_tokens`` (scoring, chain-of-thought)."""
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
