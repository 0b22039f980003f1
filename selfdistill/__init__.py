"""selfdistill: on-policy self-distillation and RLVR for LLM reasoning."""
__version__ = "0.1.0"
