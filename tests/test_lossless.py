"""The greedy --compare verdict: identical, a near-tie divergence (allowed), or a real one (a bug)."""
import torch

from gpt_fast_magicdec.config import ModelArgs
from gpt_fast_magicdec import Engine, random_model
from gpt_fast_magicdec.lossless import NEAR_TIE_GAP, compare_greedy, first_divergence, top2_gap
from gpt_fast_magicdec.model import logits_fp32

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 4, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one run stopped early


def test_identical_outputs_report_yes():
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, attention="torch")
    plain = engine.generate(PROMPTS, 8).tokens
    report = compare_greedy(engine, PROMPTS, plain, [list(t) for t in plain])
    assert report.ok and report.lines == ["greedy outputs identical: yes (2 sequences)"]


def test_divergence_at_a_tie_is_allowed_and_elsewhere_is_an_error():
    """Give token `twin` the same head row as a token the model emits: wherever that token is the
    argmax its top-2 gap is exactly 0, a tie; everywhere else the gap is a real margin."""
    model = random_model(ModelArgs.from_preset("tiny"), "cpu", torch.float32, seed=0)
    engine = Engine(model, attention="torch")
    tied = engine.generate(PROMPTS, 8).tokens[0][3]
    twin = (tied + 1) % model.args.vocab_size
    with torch.no_grad():
        model.output.weight[twin] = model.output.weight[tied]
    plain = engine.generate(PROMPTS, 8).tokens
    at_tie = next(i for i, t in enumerate(plain[0]) if t in (tied, twin))
    other = twin if plain[0][at_tie] == tied else tied
    flipped = [plain[0][:at_tie] + [other] + plain[0][at_tie + 1:], plain[1]]
    report = compare_greedy(engine, PROMPTS, plain, flipped)
    assert report.ok, report.lines
    (d,) = report.divergences
    assert (d.sequence, d.position, d.speculative, d.gap) == (0, at_tie, other, 0.0)
    assert "near-tie" in report.lines[1]

    real = next(i for i, t in enumerate(plain[1]) if t not in (tied, twin))
    wrong = [plain[0], plain[1][:real] + [(plain[1][real] + 7) % model.args.vocab_size]]
    report = compare_greedy(engine, PROMPTS, plain, wrong)
    assert not report.ok and "a bug" in report.lines[0], report.lines
    assert report.divergences[0].gap >= NEAR_TIE_GAP[torch.float32]
    assert report.divergences[0].gap == top2_gap(engine, PROMPTS[1] + plain[1][:real])


def test_lm_head_fallback_is_fp32_without_changing_fp32_results():
    """CPU has no bf16 x bf16 -> fp32 matmul: the fallback upcasts, and fp32 inputs are untouched."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 16, generator=g), torch.randn(40, 16, generator=g)
    assert torch.equal(logits_fp32(x, w), torch.nn.functional.linear(x, w))
    low = logits_fp32(x.bfloat16(), w.bfloat16())  # [2, 3, 40]
    assert low.dtype == torch.float32 and low.shape == (2, 3, 40)
    exact = x.bfloat16().double() @ w.bfloat16().double().T
    torch.testing.assert_close(low.double(), exact, atol=1e-5, rtol=1e-5)


def test_compare_exits_non_zero_on_a_real_divergence(monkeypatch):
    """generate.py --compare prints the report and fails on a divergence that is not a near-tie."""
    from click.testing import CliRunner

    from gpt_fast_magicdec.cli import generate
    from gpt_fast_magicdec import lossless

    def diverging(engine, prompts, plain, speculative):
        found = lossless.Divergence(0, 2, plain[0][2], -1, gap=1.5, threshold=1e-4)
        return lossless.LosslessReport(len(prompts), torch.float32, (found,))

    monkeypatch.setattr(lossless, "compare_greedy", diverging)
    result = CliRunner().invoke(generate.main, ["--draft", "self", "--draft-budget", "8", "--sink", "2",
                                                "--compare", "--max-new-tokens", "6", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "first divergence at new token 2" in result.output and "a real divergence" in result.output
    assert "not lossless" in result.output
