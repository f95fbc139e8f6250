"""Benchmarks of one SDPG update against GRPO and the full-logits peers (issue 4). Run `python -m bench.run`."""
