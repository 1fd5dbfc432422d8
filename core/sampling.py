"""How an engine samples: one frozen config shared by generate, label, eval compare and PPO
rollouts, and handed to the actors as itself (:meth:`actors.engine.VLLMEngineHost.complete`)."""

from __future__ import annotations

from dataclasses import dataclass

from core.config import Problem, above, at_least, at_most, failing, option


@dataclass(frozen=True)
class SamplingConfig:
    """vLLM sampling settings. Jobs nest it with their own defaults (PPO: 64 new tokens)."""

    max_new_tokens: int = option(256, "token limit for each sampled answer (and each critique and revision)",
                                 identity=True)
    temperature: float = option(1.0, "sampling temperature (0 = greedy)", identity=True)
    top_p: float = option(1.0, "nucleus sampling probability", identity=True)
    repetition_penalty: float = option(1.0, "vLLM repetition penalty (>1 discourages repeats; small models loop)",
                                       identity=True)

    def problems(self) -> list[Problem]:
        checks = {"max_new_tokens": at_least(1)(self.max_new_tokens), "temperature": at_least(0)(self.temperature),
                  "top_p": (above(0) & at_most(1))(self.top_p),
                  "repetition_penalty": above(0)(self.repetition_penalty)}
        return failing(checks)


def greedy(max_new_tokens: int) -> SamplingConfig:
    """The most likely continuation, up to ``max_new_tokens`` (scoring, chain-of-thought)."""
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
