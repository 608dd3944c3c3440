"""gpt-fast-magicdec: Llama-family inference with MagicDec sparse-KV speculative decoding."""
