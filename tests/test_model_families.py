"""Qwen3, sliding-window targets and Llama biases, end to end: converted from tiny random-weight
transformers checkpoints, greedy generation must be transformers' own `generate`, token for token
(fp32), and every drafting strategy must reproduce it. Prompts are longer than the window
(hf_fixtures.WINDOW = 8), and each windowed family is also run with its window removed to show
that the window changes the output (a test in which it did not would prove nothing)."""
import copy
import dataclasses
import warnings

import pytest
import torch
import transformers

from gpt_fast_magicdec import Engine, load_model
from gpt_fast_magicdec.checkpoint import model_from_state_dict
from gpt_fast_magicdec.convert.convert_hf_checkpoint import convert_hf_checkpoint
from gpt_fast_magicdec.drafting import DraftConfig
from hf_fixtures import WINDOW, make_hf_checkpoint

LENS = (21, 9, 30)  # ragged, all longer than the window
NEW = 20
WINDOWED = ("qwen3-window", "mistral-window", "qwen2-window")


def prompts(vocab: int, lens=LENS, seed=1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (engine model, transformers model) built from one checkpoint, on first use."""
    cache = {}

    def get(family, seed=3):
        if (family, seed) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{seed}")
            hf_dir = make_hf_checkpoint(root / "hf", family, fmt="safetensors", seed=seed)
            model = load_model(convert_hf_checkpoint(hf_dir, root / "engine"), "cpu", torch.float32)
            hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
            hf.generation_config.eos_token_id = None  # both sides generate exactly NEW tokens
            hf.generation_config.pad_token_id = 0
            cache[family, seed] = model, hf
        return cache[family, seed]
    return get


def hf_greedy(hf, ps: list, new: int = NEW) -> list:
    """transformers' greedy generate, one prompt at a time (no padding enters its attention)."""
    out = []
    with torch.no_grad():
        for p in ps:
            ids = hf.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False)
            out.append(ids[0, len(p):].tolist())
    return out


def without_window(model):
    """The same weights read as a model whose every layer attends to the whole context."""
    args = dataclasses.replace(model.args, sliding_window=None, layer_types=None)
    return model_from_state_dict(args, dict(model.state_dict()), "cpu", torch.float32)


@pytest.mark.parametrize("family", ["qwen3", "llama-bias", "ministral", *WINDOWED])
def test_plain_greedy_is_transformers_generate(converted, family):
    model, hf = converted(family)
    ps = prompts(model.args.vocab_size)
    expected = hf_greedy(hf, ps)
    # prefill_chunk 12: several chunks per prompt, so a sliding layer's prefill band spans chunks
    assert Engine(model, attention="torch").generate(ps, NEW, prefill_chunk=12).tokens == expected
    if family in WINDOWED:
        assert any(w == WINDOW for w in model.args.layer_windows)
        unwindowed = Engine(without_window(model), attention="torch").generate(ps, NEW).tokens
        assert unwindowed != expected, "the window never mattered: this test would pass without it"


STRATEGIES = {  # on a window of 8: the drafts' windows are wider, narrower and equal to it
    "self-streaming": DraftConfig(kind="self", kv="streaming", budget=12, sink=2, gamma=3),
    "self-snapkv": DraftConfig(kind="self", kv="snapkv", budget=12, window=6, gamma=3),
    "self-recent": DraftConfig(kind="self", kv="recent", budget=8, gamma=2),
    "self-pillar": DraftConfig(kind="self", kv="pillar", budget=12, window=6, gamma=3, reselect=1),
    "lookup": DraftConfig(kind="lookup", gamma=3),
    "lookup+self": DraftConfig(kind="lookup+self", kv="streaming", budget=12, sink=2, gamma=3),
    "model-streaming": DraftConfig(kind="model", kv="streaming", budget=12, sink=2, gamma=3),
    "model-snapkv": DraftConfig(kind="model", kv="snapkv", budget=12, window=6, gamma=3),
    "model-pillar": DraftConfig(kind="model", kv="pillar", budget=12, window=6, gamma=3, reselect=1),
    "model-full": DraftConfig(kind="model", kv="full", gamma=4),
}


@pytest.mark.parametrize("family", ["qwen3-window", "mistral-window"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_reproduces_transformers_on_a_windowed_target(converted, family, strategy):
    model, hf = converted(family)
    draft = STRATEGIES[strategy]
    draft_model = converted(family, seed=4)[0] if draft.kind == "model" else None  # another model
    ps = prompts(model.args.vocab_size)
    result = Engine(model, draft_model=draft_model, attention="torch").generate(ps, NEW, draft=draft)
    assert result.tokens == hf_greedy(hf, ps)
    assert result.stats.drafted > 0


@pytest.mark.parametrize("kv", ["streaming", "snapkv"])
def test_a_draft_budget_covering_the_context_sees_exactly_the_target_window(converted, kv):
    """A self-draft whose budget covers the whole context would be the target itself, but only if
    its view of each sliding layer stops at that layer's window: every draft is then accepted. A
    draft reading the sink or SnapKV keys the window excludes would be rejected now and then."""
    model, _ = converted("qwen3-window")
    draft = DraftConfig(kind="self", kv=kv, budget=64, sink=4, gamma=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the budget covers the context: said, and meant here
        result = Engine(model, attention="torch").generate(prompts(model.args.vocab_size), NEW, draft=draft)
    assert result.stats.acceptance_rate == 1.0


def test_identical_standalone_draft_on_a_windowed_target_accepts_everything(converted):
    """The windowed target as its own standalone draft, full cache: its 2-token first step and its
    own prefill go through the same windowed layers, so every draft is accepted."""
    model, hf = converted("mistral-window")
    ps = prompts(model.args.vocab_size)
    draft = DraftConfig(kind="model", kv="full", gamma=3)
    result = Engine(model, draft_model=copy.deepcopy(model), attention="torch").generate(ps, NEW, draft=draft)
    assert result.stats.acceptance_rate == 1.0
    assert result.tokens == hf_greedy(hf, ps)


@pytest.mark.slow
def test_triton_kernels_on_a_windowed_target(converted):
    """--attention triton on a sliding / full mix: verification and draft steps run the kernel with
    the layer windows (interpreted on CPU; compiled, fp32, on a CUDA machine)."""
    pytest.importorskip("triton", reason="triton is not installed")
    model, hf = converted("qwen3-window")
    device_model = copy.deepcopy(model).to("cuda") if torch.cuda.is_available() else model
    ps = prompts(model.args.vocab_size, lens=(12, 9))
    draft = DraftConfig(kind="self", kv="streaming", budget=12, sink=2, gamma=2)
    engine = Engine(device_model, attention="triton", compile=False, use_graphs=False)
    assert engine.backend == "triton"
    assert engine.generate(ps, 6, draft=draft).tokens == hf_greedy(hf, ps, 6)


def test_a_qwen3_directory_with_its_tokenizer_and_chat_template_generates_from_text(tmp_path):
    """A Qwen3 checkpoint directory as the hub ships it: byte-level BPE tokenizer.json, no BOS, a
    chat template in tokenizer_config.json, several EOS ids (<|im_end|> and another one from
    generation_config.json). Conversion keeps the tokenizer and the EOS ids, and generate.py from
    text gives transformers' greedy tokens, stopping where transformers stops."""
    import json

    from click.testing import CliRunner

    from gpt_fast_magicdec.cli import generate
    from gpt_fast_magicdec.tokenizer import load_tokenizer
    from tokenizer_fixtures import make_bpe_dir, write_configs

    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen3", fmt="safetensors", seed=5, vocab_size=400)
    make_bpe_dir(hf_dir, vocab_size=400)  # <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2
    tok = load_tokenizer(hf_dir)
    text = "The old house stood at the end of the lane"
    ids = tok.encode(text, bos=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        free = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(ids):].tolist()
    stop = free[6]  # a token greedy decoding reaches: made an EOS id, generation must stop at it
    expected = free[:free.index(stop) + 1]
    assert len(expected) < 24
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    write_configs(hf_dir, tokenizer_config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                            "chat_template": template, "add_bos_token": False},
                  generation_config={"eos_token_id": [2, stop], "do_sample": True, "temperature": 0.6, "top_k": 20})
    engine_dir = convert_hf_checkpoint(hf_dir, tmp_path / "engine")
    config = json.loads((engine_dir / "engine_config.json").read_text())
    assert config["bos_id"] is None and set(config["eos_ids"]) == {2, stop} and config["qk_norm"] is True
    tok = load_tokenizer(engine_dir)
    assert tok.bos_id is None and tok.encode(text) == ids  # no BOS is added

    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(generate.main, ["--checkpoint", str(engine_dir), "--prompt", text, "--max-new-tokens",
                                                "24", "--draft", "self", "--draft-budget", "8", "--sink", "2",
                                                "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["completion_ids"] == expected and row["finish_reason"] == "eos"
