"""Models the project builds itself: the character tokenizer and the tiny Llama-style default."""
