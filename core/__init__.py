"""Pure cores: math and bookkeeping that import neither ``ray`` nor ``vllm``.

PPO/GAE and losses, soft preference labels, critique/revision chains, shard plans and
manifests, prompt data, evaluation statistics, reward functions and the config system.
Tested on small hand-made inputs in milliseconds (``tests/core``).
"""
