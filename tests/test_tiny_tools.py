"""The bundled models' training and measurement tools (tools/tiny_model): continuing a model
(`--init-from`, how the 8K target was made) and distilling a draft from a target (`--distill-from`,
how the bundled draft was made) run end to end on a toy corpus and write loadable Hugging Face
directories with the right config and tokenizer files; the loss-by-position and acceptance helpers
compute what they say."""
import json
from pathlib import Path

import pytest
import torch

from gpt_fast_magicdec.tiny import bundled_draft_hf_dir, bundled_hf_dir
from tools.tiny_model import measure_acceptance, position_loss, train
from tools.tiny_model.causal import causal_logits
from tools.tiny_model.export import load_hf_model

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A JSONL corpus in the real one's format: the two held-out book ids and two training books."""
    long_text = (DATA / "long_passage.txt").read_text(encoding="utf-8")
    short_text = (DATA / "tiny_passage.txt").read_text(encoding="utf-8")
    books = [(84, "held out 1", long_text[:6000]), (2852, "held out 2", long_text[6000:12000]),
             (1, "train 1", long_text[12000:] + short_text), (2, "train 2", short_text * 3)]
    path = tmp_path_factory.mktemp("corpus") / "books.jsonl"
    path.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n" for i, t, x in books))
    return path


def run_train(corpus, out, **extra):
    args = dict(corpus=corpus, out_dir=out, minutes=5.0, seed=0, steps=2, threads=1, vocab_size=4096,
                tokenizer_sample_mb=1.0, tokenizer_from=None, init_from=None, distill_from=None,
                distill_weight=1.0, self_draft=None, self_draft_weight=1.0, name="test-model", tie_embeddings=False, dim=256, n_layers=6, n_heads=8,
                n_kv_heads=2, intermediate_size=704, rope_base=10000.0, context=128, val_context=0,
                max_position_embeddings=16384, curriculum="64:0.5,128:0.5", tokens_per_step=256, lr=1e-3,
                min_lr_ratio=0.1, warmup_steps=1, weight_decay=0.1, grad_clip=1.0, evals=1, val_windows=1,
                final_val_windows=1, save_dtype="bfloat16", log_every=1, check_hf=False)
    args.update(extra)
    return train.run(**args)


def test_continue_a_model_with_a_longer_context(corpus, tmp_path):
    out = tmp_path / "continued"
    log = run_train(corpus, out, init_from=bundled_hf_dir(), val_context=96)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 256 and cfg["max_position_embeddings"] == 16384  # the shape is the source's
    assert cfg["_name_or_path"] == "test-model"
    # a continued model writes its own tokenizer_config (model_max_length follows the new context)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 16384
    assert (out / "tokenizer.model").read_bytes() == (bundled_hf_dir() / "tokenizer.model").read_bytes()
    assert log["config"]["init_from"] == "model" and log["config"]["val_context"] == 96
    assert log["steps"] == 2 and log["final_val_tokens"] == 2 * 96
    source = load_hf_model(bundled_hf_dir())
    continued = load_hf_model(out)
    moved = [n for n, p in continued.named_parameters() if not torch.equal(p, source.state_dict()[n])]
    assert moved, "two optimizer steps must change the weights"


def test_distill_a_draft_from_its_target(corpus, tmp_path):
    out = tmp_path / "draft"
    log = run_train(corpus, out, init_from=bundled_draft_hf_dir(), tokenizer_from=bundled_hf_dir(),
                    distill_from=bundled_hf_dir(), name="test-draft")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 128 and cfg["tie_word_embeddings"] is True
    # a draft copies its target's tokenizer_config byte for byte (tokenizer fingerprints must match)
    assert (out / "tokenizer_config.json").read_bytes() == (bundled_hf_dir() / "tokenizer_config.json").read_bytes()
    assert log["config"]["distill_from"] == "model" and log["config"]["distill_weight"] == 1.0


def test_distillation_loss_is_cross_entropy_against_the_teacher():
    torch.manual_seed(0)
    student, teacher = load_hf_model(bundled_draft_hf_dir()), load_hf_model(bundled_hf_dir()).eval()
    batch = torch.randint(3, 4096, (1, 16), dtype=torch.int16)
    loss, ce = train.train_step_loss(student, batch, teacher, distill_weight=1.0)
    inputs, targets = train.with_bos(batch)
    with torch.no_grad():
        p = torch.softmax(causal_logits(teacher, inputs)[0], -1)
        log_q = torch.log_softmax(causal_logits(student, inputs)[0], -1)
        plain = torch.nn.functional.cross_entropy(causal_logits(student, inputs)[0], targets[0])
    assert torch.allclose(loss, -(p * log_q).sum(-1).mean(), atol=1e-5)
    assert torch.allclose(ce, plain, atol=1e-5)
    mixed, _ = train.train_step_loss(student, batch, teacher, distill_weight=0.25)
    assert torch.allclose(mixed, 0.25 * loss + 0.75 * ce, atol=1e-5)
    alone, ce_alone = train.train_step_loss(student, batch)
    assert torch.equal(alone, ce_alone)


def test_train_a_model_as_its_own_streaming_draft(corpus, tmp_path):
    log = run_train(corpus, tmp_path / "self-draft", init_from=bundled_hf_dir(), self_draft="4:24",
                    self_draft_weight=2.0)
    assert log["config"]["self_draft"] == "4:24" and log["config"]["self_draft_weight"] == 2.0
    assert log["config"]["self_draft_eval_from_position"] == 96  # the last quarter of 128
    history = log["val_history"]["self_draft"]
    assert len(history) == len(log["val_history"]["loss"])  # one per validation
    assert log["final_self_draft"] == history[-1]
    assert 0.0 <= history[-1]["argmax_agreement"] <= 1.0 and history[-1]["view_kl"] > 0.0


def test_self_draft_loss_adds_the_kl_from_target_to_draft():
    torch.manual_seed(0)
    model = load_hf_model(bundled_hf_dir())
    batch = torch.randint(3, 4096, (1, 80), dtype=torch.int16)
    view = train.parse_self_draft("4:24")
    loss, ce = train.train_step_loss(model, batch, self_draft=view, self_draft_weight=3.0)
    inputs, targets = train.with_bos(batch)
    with torch.no_grad():
        target, draft = causal_logits(model, inputs, view)  # the twin pass: target rows, then draft rows
        log_p, log_q = torch.log_softmax(target, -1), torch.log_softmax(draft, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [80] per position
    assert kl[:28].abs().max() < 1e-5  # sink + window covers every earlier position: the same model
    assert kl[28:].min() > 0
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(target, targets[0]))
    torch.testing.assert_close(loss, ce + 3.0 * kl.mean())
    wide = train.parse_self_draft("4:100")  # the window holds everything: no KL, only the text
    loss, ce = train.train_step_loss(model, batch, self_draft=wide, self_draft_weight=3.0)
    torch.testing.assert_close(loss, ce)


@pytest.mark.parametrize("spec", ["16", "a:b", "16:0", "-1:10"])
def test_self_draft_spec_errors(spec):
    from gpt_fast_magicdec.errors import UserError

    with pytest.raises(UserError, match="--self-draft"):
        train.parse_self_draft(spec)


def test_position_loss_scores_the_self_draft_view(corpus, tmp_path):
    """The tool's --self-draft panel: the loss is the plain pass's; where sink + window cover every
    earlier position, the draft agrees with the model exactly."""
    from click.testing import CliRunner

    windows = position_loss.held_out_windows(bundled_hf_dir(), corpus, 96, 96)[:2]
    plain = position_loss.scores_by_position(bundled_hf_dir(), windows)
    twin = position_loss.scores_by_position(bundled_hf_dir(), windows, train.parse_self_draft("4:24"))
    torch.testing.assert_close(twin["loss"], plain["loss"])
    assert torch.all(twin["agreement"][:28] == 1.0) and twin["kl"][:28].abs().max() < 1e-5
    assert twin["kl"][28:].min() > 0 and 0.0 <= float(twin["agreement"][28:].mean()) <= 1.0
    out = tmp_path / "by_position"
    result = CliRunner().invoke(position_loss.main, [
        "--model", f"{bundled_hf_dir()}=shipped", "--corpus", str(corpus), "--context", "96", "--bin-size", "16",
        "--self-draft", "4:24", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["self_draft"] == "4:24" and len(report["models"][0]["self_draft_agreement_by_bin"]) == 6
    assert out.with_suffix(".png").stat().st_size > 0


def test_loss_by_position_bins():
    per_position = torch.arange(8, dtype=torch.float64)
    assert position_loss.binned(per_position, 4) == [1.5, 5.5]
    assert position_loss.binned(per_position, 3) == [1.0, 4.0]  # a partial last bin is dropped


def test_acceptance_prompts_end_at_the_same_positions():
    book = list(range(100, 400))
    prompts = measure_acceptance.cut_prompts(book, 1, [16, 32], batch=3, new_tokens=8)
    for short, long in zip(prompts[16], prompts[32]):
        assert short[0] == long[0] == 1 and len(short) == 16 and len(long) == 32
        assert short[-1] == long[-1] and short[1:] == long[-15:]


def test_acceptance_headline_reads_the_long_context_rows():
    rows = [{"prompt_len": L, "draft": "streaming", "budget": 512, "gamma": 3, "draft_model": None,
             "acceptance_rate": a} for L, a in ((1024, 0.9), (8192, 0.82))]
    rows.append({"prompt_len": 8192, "draft": "streaming", "budget": 512, "gamma": 3, "draft_model": "d",
                 "acceptance_rate": 0.5})  # the standalone draft's row must not be picked
    text = measure_acceptance.headline({"prompt_lens": [1024, 8192]}, rows)[0]
    assert "**0.820** at 8192 tokens" in text and "a drop of **0.080** from 1024 tokens" in text


def test_held_out_windows_overlap_by_the_stride(corpus):
    half = position_loss.held_out_windows(bundled_hf_dir(), corpus, 64, 32)
    whole = position_loss.held_out_windows(bundled_hf_dir(), corpus, 64, 64)
    assert half.shape[1] == whole.shape[1] == 64 and len(half) >= 2 * len(whole) - 2
    assert torch.equal(half[2], whole[1])  # both start at token 64 of the first held-out book


def test_acceptance_markdown_names_the_book_and_the_draft(tmp_path):
    meta = {"params": 6.3e6, "train_context": 8448, "draft_model": "bundled-draft", "draft_params": 1.2e6,
            "book": {"id": 84, "title": "Frankenstein", "tokens": 1000}, "batch": 2, "new_tokens": 8, "sink": 16,
            "gammas": [3], "prompt_lens": [1024, 8192], "plot": "acc.png", "command": "cmd", "git_commit": "abc",
            "date": "today", "cpu": "x86_64", "threads": 1, "torch": "2.x", "wall_time_s": 60}
    rows = [{"prompt_len": 1024, "draft": "full", "budget": -1, "gamma": 3, "draft_model": "bundled-draft",
             "acceptance_rate": 0.6, "mean_accepted_per_round": 2.5, "matches_greedy": True}]
    measure_acceptance.write_markdown(tmp_path / "acc.md", meta, rows)
    text = (tmp_path / "acc.md").read_text()
    assert "held-out book 84 *Frankenstein*" in text and "standalone draft `bundled-draft` (1.20M" in text
    assert "| 1024 | standalone `bundled-draft`, full KV | **0.600** / 2.50 |" in text
