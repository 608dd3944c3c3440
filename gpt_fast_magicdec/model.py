"""The Llama-family Transformer, gpt-fast style: one forward(tokens, view) for every mode.

Covers Llama 1/2/3/3.1/3.2 (with or without attention / MLP biases), Mistral and Ministral,
Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm, explicit head_dim) and TinyLlama, with
sliding-window attention on the layers the config names. RoPE uses the Hugging Face rotate-half
layout, so converted weights need no permutation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AttentionView
from .cache import KVCache
from .config import ModelArgs, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like transformers, then scale in the model dtype.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(args: ModelArgs, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_seq_len, head_dim] in fp32 (rotate-half layout: freqs repeated)."""
    inv_freq = rope_inv_freq(args).float()  # [D/2]
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # [S, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # [S, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D] already gathered at the tokens' positions."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


# device type -> whether torch.mm(bf16, bf16, out_dtype=fp32) runs there; filled eagerly by
# probe_fp32_matmul (a probe inside a compiled function would break its graph).
_FP32_OUT_MATMUL: dict = {}


def probe_fp32_matmul(device) -> bool:
    """Whether this device has a low-precision matmul with an fp32 output (CUDA, torch >= 2.8)."""
    device = torch.device(device)
    if device.type not in _FP32_OUT_MATMUL:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            _FP32_OUT_MATMUL[device.type] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, NotImplementedError, RuntimeError):  # older torch, or not on this backend (CPU)
            _FP32_OUT_MATMUL[device.type] = False
    return _FP32_OUT_MATMUL[device.type]


def logits_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32: x [..., dim] @ weight [V, dim]^T -> fp32 logits [..., V].

    bf16 logits would round near-ties differently in verification (B*(gamma+1) rows) and plain
    decoding (B rows), flipping greedy tokens. Where the device has a bf16 x bf16 -> fp32
    matmul (CUDA) the weight stays in bf16: upcasting it every step would double the head's memory
    traffic. Elsewhere (CPU, where models run in fp32 anyway) the operands are upcast."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(x, weight)
    if x.dtype == weight.dtype and _FP32_OUT_MATMUL.get(x.device.type, False):
        flat = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=torch.float32)  # [N, V]
        return flat.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x.float(), weight.float())


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        # q, k and v share one matmul; checkpoints keep them apart (see _fuse_qkv).
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=args.out_bias)
        # Qwen3: one RMSNorm over head_dim shared by every query head, one by every key head.
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.sliding_window = args.layer_windows[layer_id]  # None: this layer attends to the whole context
        self.kv_cache: Optional[KVCache] = None
        self._register_load_state_dict_pre_hook(self._fuse_qkv)

    def _fuse_qkv(self, state_dict, prefix, *args):
        for suffix in ("weight", "bias"):
            names = [f"{prefix}w{x}.{suffix}" for x in "qkv"]
            if names[0] in state_dict:
                state_dict[f"{prefix}wqkv.{suffix}"] = torch.cat([state_dict.pop(n) for n in names])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view: AttentionView) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]; the view writes the cache and attends (attention.py)."""
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, H_kv, D]
        if self.q_norm is not None:  # before RoPE, as transformers' Qwen3Attention
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)  # [B, H(_kv), T, D]
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        out = view.attend(self.layer_id, q, k, v, self.kv_cache, self.sliding_window)  # [B, H, T, D]
        return self.wo(out.transpose(1, 2).reshape(B, T, q_size))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)  # gate
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=args.mlp_bias)  # up
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, view: AttentionView) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, view)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.max_batch_size = self.max_seq_len = 0
        # Set by tp.shard_output_head: this rank holds only a slice of the head's vocabulary rows
        # and forward() returns logits for that slice. None: the whole vocabulary.
        self.vocab_shard = None

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> None:
        """Allocate the static KV cache [B, H_kv, S_max, D] per layer and the RoPE tables."""
        dtype = dtype or self.output.weight.dtype
        device = device or self.output.weight.device
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:  # free the old cache first: old and new would not fit together
            layer.attention.kv_cache = None
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(max_batch_size, self.args.n_kv_heads, max_seq_len,
                                               self.args.head_dim, dtype, device)
        probe_fp32_matmul(device)  # before any compiled step reads the answer
        cos, sin = rope_tables(self.args, max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def forward(self, tokens: torch.Tensor, view: AttentionView, output_index: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """tokens [B, T] through `view` -> fp32 logits [B, T, V], or [B, K, V] at positions
        output_index [B, K]. With a vocab-sharded head (tensor parallelism) V is this rank's slice,
        vocab_shard.size."""
        cos, sin = view.rotary(self, tokens.shape[1])  # [B or 1, 1, T, D]
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            x = layer(x, cos, sin, view)
        if output_index is not None:  # only the rows we sample from pay for the vocab projection
            x = torch.gather(x, 1, output_index[..., None].expand(-1, -1, x.shape[-1]))
        return logits_fp32(self.norm(x), self.output.weight)
