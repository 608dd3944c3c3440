"""Write an engine `Transformer` as a Hugging Face `LlamaForCausalLM` directory, and check it.

The reverse of `checkpoint.hf_to_engine_name`: the fused `wqkv` is split back into q/k/v by
sizes (H * hd, H_kv * hd, H_kv * hd). No q/k permutation is needed because the engine uses the
Hugging Face rotate-half RoPE layout."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors.torch import save_file

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec.model import Transformer
from .corpus import BOS_ID, EOS_ID

MAX_FILE_BYTES = 16 * 2**20  # every bundled file stays under this (single safetensors file here)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face Llama names, cast to `dtype`, contiguous."""
    a = model.args
    q_size, kv_size = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    out = {"model.embed_tokens.weight": model.tok_embeddings.weight, "model.norm.weight": model.norm.weight}
    if not a.tie_word_embeddings:
        out["lm_head.weight"] = model.output.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = layer.attention.wqkv.weight.split([q_size, kv_size, kv_size], dim=0)
        out.update({
            p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": layer.attention.wo.weight,
            p + "mlp.gate_proj.weight": layer.feed_forward.w1.weight,
            p + "mlp.up_proj.weight": layer.feed_forward.w3.weight,
            p + "mlp.down_proj.weight": layer.feed_forward.w2.weight,
            p + "input_layernorm.weight": layer.attention_norm.weight,
            p + "post_attention_layernorm.weight": layer.ffn_norm.weight,
        })
    return {k: v.detach().to(dtype).contiguous().clone() for k, v in out.items()}


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """config.json for LlamaForCausalLM. RoPE is written both ways (transformers 4 reads
    `rope_theta`, 5 reads `rope_parameters`)."""
    if args.rope_scaling is not None or args.qkv_bias:
        raise ValueError("the tiny model exporter writes plain Llama configs only")
    return {
        "_name_or_path": args.name,  # the engine names converted checkpoints after it
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_base},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": args.tie_word_embeddings,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "dtype": _DTYPE_NAMES[dtype],
    }


TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "sp_model_kwargs": {},
}


def export_hf(model: Transformer, tokenizer_model: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16,
              model_max_length: Optional[int] = None) -> Path:
    """Write `model` + the SentencePiece `tokenizer_model` as a Hugging Face Llama directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model, dtype)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if nbytes > MAX_FILE_BYTES:
        raise ValueError(f"weights take {nbytes / 2**20:.1f} MiB, over the {MAX_FILE_BYTES >> 20} MiB per-file "
                         "limit: export in bfloat16 or train a smaller model")
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)  # safetensors creates it 0600; it ships in the package
    (out_dir / "config.json").write_text(json.dumps(hf_config(model.args, dtype), indent=2) + "\n")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok_cfg = dict(TOKENIZER_CONFIG, model_max_length=model_max_length or model.args.max_position_embeddings)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    if Path(tokenizer_model).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    return out_dir


def write_tokenizer_json(hf_dir: Path, check_texts: Iterable[str] = ()) -> bool:
    """Add `tokenizer.json` (a `tokenizers` BPE equal to `tokenizer.model`) to `hf_dir`, so
    transformers' AutoTokenizer loads it without protobuf or a slow-to-fast conversion. Needs
    transformers. The merges are what SentencePiece BPE does implicitly: every split of a piece
    into two pieces, ranked by the merged piece's score (its id). Returns False, writing nothing,
    if it encodes any of `check_texts` differently from SentencePiece."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    hf_dir = Path(hf_dir)
    sp = spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    merges = []
    for piece, i in vocab.items():
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or len(piece) < 2:
            continue
        merges += [(i, vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in vocab and piece[k:] in vocab]
    merges.sort()
    tok = LlamaTokenizer(vocab=vocab, merges=[(left, right) for *_, left, right in merges], legacy=False,
                         add_bos_token=True, add_eos_token=False)
    for text in check_texts:
        if tok(text).input_ids != [BOS_ID] + sp.encode(text):
            return False
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)  # writes its own tokenizer_config.json too; ours is kept
        shutil.copyfile(Path(tmp) / "tokenizer.json", hf_dir / "tokenizer.json")
    return True


def load_hf_model(hf_dir: Path, max_position_embeddings: Optional[int] = None) -> Transformer:
    """The Hugging Face Llama in `hf_dir` as a float32 engine `Transformer` with trainable
    parameters, read through the project's own converter (so training continues from exactly the
    weights the engine serves). `max_position_embeddings` replaces the config's value."""
    import dataclasses

    from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint

    from gpt_fast_magicdec.checkpoint import load_engine_checkpoint, model_from_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        args, state_dict = load_engine_checkpoint(convert_hf_checkpoint(hf_dir, Path(tmp) / "engine"))
    if max_position_embeddings is not None:
        args = dataclasses.replace(args, max_position_embeddings=max_position_embeddings)
    model = model_from_state_dict(args, state_dict, "cpu", torch.float32)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.train()


def compare_with_transformers(hf_dir: Path, tokens: torch.Tensor) -> float:
    """Max |logit difference| between transformers' LlamaForCausalLM and the engine (both fp32,
    weights read from `hf_dir` and converted with the project's converter) on `tokens` [B, T]."""
    import transformers

    from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint

    from gpt_fast_magicdec.checkpoint import load_model
    from .causal import causal_logits

    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens).logits.float()  # [B, T, V]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = convert_hf_checkpoint(hf_dir, Path(tmp) / "engine")
        model = load_model(ckpt, "cpu", torch.float32)
        with torch.no_grad():
            ours = causal_logits(model, tokens)  # [B, T, V]
    return float((ours - ref).abs().max())
