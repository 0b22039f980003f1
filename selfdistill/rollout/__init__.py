"""Rollout: the engine interface, the vLLM and transformers engines, and the Ray actor around them."""
