"""Training ForesightKV scorers (needs torch, safetensors and tqdm; the LLM side needs
``foresightkv.testbed``, i.e. transformers):

- ``scorer``: the scorer MLP in PyTorch, equal to the core's ``scorer_mlp``, exported as a core
  checkpoint;
- ``labels`` / ``episodes``: Golden-trajectory features and labels captured through the eviction
  simulator and stored as safetensors; sampled trajectories for RL;
- ``losses``: the pairwise hinge ranking loss, the low-entropy reward, group advantages, the
  Plackett-Luce log-probability of the sampler's draws, the clipped GRPO objective;
- ``supervised`` / ``rl``: the two training stages;
- ``pipeline`` / ``cli``: ``foresightkv train``, one resumable command from traces to a checkpoint."""
