"""Generate text with plain or MagicDec speculative decoding.

  python generate.py --draft self --compare                       # bundled tiny model
  python generate.py --checkpoint ckpt/llama-3.1-8b --prompt-file docs.jsonl --bsz 32 \\
      --draft self --draft-kv streaming --draft-budget 512 --gamma 3 --out out.jsonl
  torchrun --nproc_per_node 8 generate.py --checkpoint ... --bsz 64 --gamma 3    # tensor parallel

Under torchrun only rank 0 prints and writes --out.
"""
from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path
from typing import Optional

import click
import torch

from gpt_fast_magicdec.config import PRESETS, ModelArgs
from gpt_fast_magicdec.cost_model import decode_step_cost, get_profile, measure_hardware
from gpt_fast_magicdec.data import read_jsonl_prompts, write_jsonl
from gpt_fast_magicdec.drafting import DraftConfig
from gpt_fast_magicdec.engine import Engine, load_model, random_model, set_compiler_flags
from gpt_fast_magicdec.errors import UserError
from gpt_fast_magicdec.sampling import SamplingParams
from gpt_fast_magicdec.tokenizer import load_tokenizer
from gpt_fast_magicdec.tp import TensorParallel, env_world_size, fail_together, is_main_process

PLAIN = "plain decoding"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def read_prompts(prompt: tuple, prompt_file: Optional[Path]) -> list[str]:
    """--prompt (repeatable) and/or --prompt-file: JSONL with a `text` field, or plain text."""
    return list(prompt) + (read_jsonl_prompts(prompt_file) if prompt_file is not None else [])


def batches(items: list, size: int):
    """Fill one batch by cycling when there are fewer prompts than --bsz, else chunk them."""
    if len(items) < size:
        items = list(itertools.islice(itertools.cycle(items), size))
    for start in range(0, len(items), size):
        yield items[start:start + size]


def build_draft_config(draft, draft_checkpoint, draft_kv, draft_budget, sink, draft_window, gamma) -> DraftConfig:
    if draft is None:
        draft = "model" if draft_checkpoint else "none"
    if draft == "model" and not draft_checkpoint:
        raise UserError("--draft model needs --draft-checkpoint DIR")
    if draft_checkpoint and draft != "model":
        raise UserError(f"--draft-checkpoint was given but --draft is {draft!r}: drop one of them")
    gamma_value = 3 if gamma == "auto" else _int_option("--gamma", gamma)
    return DraftConfig(kind=draft, kv=draft_kv, budget=draft_budget, sink=sink, window=draft_window,
                       gamma=gamma_value)


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer or 'auto', got {value!r}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint directory (convert/convert_hf_checkpoint.py). Default: the bundled "
                   "tiny model, converted on first use.")
@click.option("--random-weights", type=click.Choice(sorted(PRESETS)), default=None,
              help="Run a preset shape with random weights instead of a checkpoint (benchmarks): the text is noise.")
@click.option("--prompt", multiple=True, help="A prompt; repeat for several.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompts from a JSONL file (one object per line with a 'text' field) or one plain-text prompt.")
@click.option("--prompt-length", type=int, default=128, show_default=True,
              help="With --random-weights and no prompt: length of the random-token prompts.")
@click.option("--bsz", type=int, default=1, show_default=True,
              help="Batch size. Fewer prompts are cycled to fill the batch; more are run in batches of this size.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True, help="Token limit per sequence.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling threshold (with --temperature > 0).")
@click.option("--top-k", type=int, default=None, help="Keep only the k most likely tokens (with --temperature > 0).")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (sampling, random weights).")
@click.option("--device", default=None, help="cuda, cuda:1, cpu... Default: cuda if available.")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default=None,
              help="Weights and KV cache dtype. Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--compile/--no-compile", default=None,
              help="torch.compile the decode steps. Default: on for CUDA (with CUDA graphs), off on CPU.")
@click.option("--attention", type=click.Choice(["auto", "torch", "triton"]), default="auto", show_default=True,
              help="Decode attention: Triton kernels (auto on CUDA) or the plain-torch reference.")
@click.option("--prefill-chunk", type=int, default=2048, show_default=True,
              help="Prefill this many prompt tokens per forward pass (bounds activation memory).")
@click.option("--max-seq-len", type=int, default=None,
              help="Longest prompt + new tokens allowed. Default: the model's max_position_embeddings.")
@click.option("--draft", type=click.Choice(["none", "self", "model"]), default=None,
              help="none: plain decoding; self: self-speculation over the target's own cache; model: a "
                   "standalone draft (--draft-checkpoint). Default: model if --draft-checkpoint, else none.")
@click.option("--draft-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Converted checkpoint of a standalone draft model sharing the target's tokenizer.")
@click.option("--draft-kv", type=click.Choice(["streaming", "snapkv"]), default="streaming", show_default=True,
              help="Which keys the draft reads besides its sliding window: StreamingLLM sink or SnapKV picks.")
@click.option("--draft-budget", type=int, default=512, show_default=True,
              help="Keys the draft reads per query (selected + window); -1 = full cache (standalone draft only).")
@click.option("--sink", type=int, default=16, show_default=True, help="Streaming view: attention-sink positions.")
@click.option("--draft-window", type=int, default=None,
              help="Sliding window of the draft. Default: budget - sink (streaming), budget / 4 (snapkv).")
@click.option("--gamma", default="3", show_default=True,
              help="Draft tokens per round (>= 1), or 'auto' to pick it (or plain decoding) from the cost model "
                   "and the running acceptance rate.")
@click.option("--draft-ranks", default=None,
              help="Tensor parallel only: comma-separated ranks that hold the standalone draft (e.g. 0,1,2,3).")
@click.option("--compare", is_flag=True,
              help="Run plain decoding and the chosen speculative decoding on the same prompts; print the speedup.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one JSON line per prompt: prompt, completion, token counts, finish reason.")
@click.option("--simulate-acceptance", type=float, default=None, hidden=True,
              help="bench.py only; refused here.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on long prefill.")
def main(**opts):
    """Generate from a Llama-family model with optional MagicDec speculative decoding.

    Prints the completions and a summary: prefill time, decode tokens/s, per-sequence latency,
    peak memory, and for speculative runs acceptance, tokens per round and the time split."""
    warnings.showwarning = _one_line_warning
    try:
        run(**opts)
    except UserError as err:
        echo(f"error: {err}", err=True)  # under torchrun every rank raises the same error; rank 0 says it
        sys.exit(1)


def echo(*args, **kwargs) -> None:
    """click.echo on rank 0 only (everywhere outside torchrun)."""
    if is_main_process():
        click.echo(*args, **kwargs)


def _one_line_warning(message, *args, **kwargs):
    echo(f"warning: {message}", err=True)


def run(checkpoint, random_weights, prompt, prompt_file, prompt_length, bsz, max_new_tokens, temperature, top_p,
        top_k, seed, device, dtype, compile, attention, prefill_chunk, max_seq_len, draft, draft_checkpoint,
        draft_kv, draft_budget, sink, draft_window, gamma, draft_ranks, compare, out, simulate_acceptance,
        progress):
    if simulate_acceptance is not None:
        raise UserError("--simulate-acceptance is a benchmark-only mode (bench.py): generate.py never fakes acceptance")
    if bsz < 1 or prefill_chunk < 1:
        raise UserError("--bsz and --prefill-chunk must be >= 1")
    if checkpoint is not None and random_weights is not None:
        raise UserError("give either --checkpoint or --random-weights, not both")
    draft_cfg = build_draft_config(draft, draft_checkpoint, draft_kv, draft_budget, sink, draft_window, gamma)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[dtype] if dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if draft_ranks is not None and env_world_size() == 1:
        raise UserError("--draft-ranks needs tensor parallelism: launch with torchrun --nproc_per_node N")
    if draft_ranks is not None and draft_cfg.kind != "model":
        raise UserError("--draft-ranks places a standalone draft (--draft-checkpoint); it does not apply to "
                        f"--draft {draft_cfg.kind}")
    # Tensor parallel under torchrun (None otherwise). Every check above runs on every rank before
    # the first collective, so a bad flag fails everywhere instead of hanging.
    tp = TensorParallel.start(device, draft_ranks)
    if tp is not None and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    progress = progress and is_main_process()
    torch.manual_seed(seed)  # the same seed on every rank: sampling stays in lock-step (see tp.py)
    if device.type == "cuda":
        set_compiler_flags()

    with fail_together(tp):  # one rank failing to load makes every rank fail with its message
        tokenizer = None
        if random_weights:
            echo(f"random weights ({random_weights}): the generated text is noise; use this for speed only")
            target_args = ModelArgs.from_preset(random_weights)
            model = (tp.random_model(target_args, device, dtype, seed) if tp
                     else random_model(target_args, device, dtype, seed))
        else:
            if checkpoint is None:
                from gpt_fast_magicdec.tiny import bundled_checkpoint

                checkpoint = bundled_checkpoint()
            model = tp.load_model(checkpoint, device, dtype) if tp else load_model(checkpoint, device, dtype)
            target_args = ModelArgs.load(checkpoint)  # the full shape (model.args is this rank's shard)
            tokenizer = load_tokenizer(checkpoint)
        draft_model = None
        if draft_cfg.kind == "model":
            if tp is None:
                draft_model = load_model(draft_checkpoint, device, dtype)
            elif tp.holds_draft:
                draft_model = tp.load_model(draft_checkpoint, device, dtype, draft=True)
            if tokenizer is not None and load_tokenizer(draft_checkpoint).fingerprint() != tokenizer.fingerprint():
                raise UserError(f"the draft's tokenizer ({draft_checkpoint}) differs from the target's: "
                                "speculative decoding needs both models to share one vocabulary")
        engine = Engine(model, draft_model=draft_model, attention=attention, compile=compile, tp=tp)

    texts = read_prompts(prompt, prompt_file)
    if tokenizer is None:
        if texts:
            raise UserError("--random-weights has no tokenizer: use --prompt-length instead of prompt text")
        gen = torch.Generator().manual_seed(seed)
        prompt_ids = [torch.randint(model.args.vocab_size, (prompt_length,), generator=gen).tolist()
                      for _ in range(bsz)]
    else:
        texts = texts or ["Once upon a time"]
        prompt_ids = [tokenizer.encode(t) for t in texts]
    eos_ids = tokenizer.eos_ids if tokenizer is not None else ()
    gamma_controller = None
    if gamma == "auto" and draft_cfg.enabled:
        from gpt_fast_magicdec.autogamma import AutoGamma

        # Full (unsharded) shapes; under TP every rank uses rank 0's measured hardware, so all ranks
        # pick the same gamma every round.
        hw = get_profile("measure", device)
        hw = tp.broadcast_object(hw) if tp else hw
        draft_args = ModelArgs.load(draft_checkpoint) if draft_cfg.kind == "model" else None
        gamma_controller = AutoGamma(target_args, hw, draft_cfg, dtype.itemsize, tp.world_size if tp else 1,
                                     draft_args)

    def generate_all(cfg: DraftConfig, controller):
        results = []
        for batch in batches(list(range(len(prompt_ids))), bsz):
            res = engine.generate([prompt_ids[i] for i in batch], max_new_tokens, sampling, cfg, eos_ids,
                                  prefill_chunk, max_seq_len, progress, gamma_controller=controller)
            results.append((batch, res))
        return results

    runs = []
    if compare:
        if not draft_cfg.enabled:
            raise UserError("--compare needs a draft (--draft self or --draft-checkpoint)")
        runs.append((PLAIN, generate_all(DraftConfig(kind="none"), None)))
    name = f"draft: {draft_cfg.describe()}" if draft_cfg.enabled else PLAIN
    runs.append((name, generate_all(draft_cfg, gamma_controller)))

    final = runs[-1][1]
    for batch, res in final:
        for i, toks in zip(batch, res.tokens):
            shown = tokenizer.decode(toks) if tokenizer else " ".join(map(str, toks[:32])) + " ..."
            echo(f"--- [{i}] {shown}")
    for name, results in runs:
        echo(f"== {name}")
        for _, res in results:
            for line in res.stats.summary_lines():
                echo("   " + line)
    if compare:
        tps = [sum(r.stats.tokens_per_s for _, r in results) / len(results) for _, results in runs]
        echo(f"== speedup over plain decoding: {tps[1] / tps[0]:.2f}x")
        if sampling.greedy:  # identical, or the first divergence and whether it is a near-tie
            from gpt_fast_magicdec.lossless import compare_greedy

            report = compare_greedy(engine.model, [prompt_ids[i] for batch, _ in final for i in batch],
                                    [t for _, res in runs[0][1] for t in res.tokens],
                                    [t for _, res in final for t in res.tokens])
            for line in report.lines:
                echo(f"   {line}")
            if not report.ok:
                raise UserError("greedy speculative output diverged from plain decoding where the target "
                                "has no near-tie: speculative decoding is not lossless here (a bug)")
    plain = [results for name, results in runs if name == PLAIN]
    if plain and is_main_process():
        echo(bandwidth_line(target_args, plain[0], dtype, tp.world_size if tp else 1, device))
    if out is not None and is_main_process():
        write_jsonl(out, completion_rows(texts, prompt_ids, final, tokenizer, eos_ids))
        echo(f"wrote {out}")


def completion_rows(texts, prompt_ids, results, tokenizer, eos_ids):
    for batch, res in results:
        for i, toks in zip(batch, res.tokens):
            yield {"prompt": texts[i] if texts else None,
                   "completion": tokenizer.decode(toks) if tokenizer else None,
                   "completion_ids": toks, "prompt_tokens": len(prompt_ids[i]), "new_tokens": len(toks),
                   "finish_reason": "eos" if toks and toks[-1] in eos_ids else "length"}


def bandwidth_line(args: ModelArgs, results, dtype: torch.dtype, tp_size: int, device: torch.device) -> str:
    """Plain decoding against the memory-bandwidth roofline: bytes one step must read (weights + live
    KV, cost model) over the measured time per step, as a fraction of measured copy bandwidth."""
    achieved = []
    for _, res in results:
        st = res.stats
        context = sum(st.prompt_tokens) / st.batch_size + sum(st.new_tokens) / st.batch_size / 2
        step = decode_step_cost(args, st.batch_size, int(context), 1, dtype.itemsize, tp_size)
        achieved.append(step.bytes / (st.decode_s / max(st.rounds, 1)))
    copy_bw = measure_hardware(device).mem_bandwidth
    mean = sum(achieved) / len(achieved)
    return (f"   memory bandwidth (plain decoding): {mean / 1e9:.1f} GB/s achieved per rank = "
            f"{100 * mean / copy_bw:.0f}% of measured copy bandwidth ({copy_bw / 1e9:.0f} GB/s)")


if __name__ == "__main__":
    try:
        main()
    finally:
        if torch.distributed.is_initialized():  # torchrun: leave the process group cleanly
            torch.distributed.destroy_process_group()
