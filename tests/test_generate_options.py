"""Every option of gfm-generate is used by the run or says it is ignored: a walk over the click
parameters in every mode, so a new option cannot be silently dropped."""
import click
import pytest
from click.core import ParameterSource

from gpt_fast_magicdec.cli import generate
from gpt_fast_magicdec.errors import UserError

# The modes a run can be in, as command lines (each is checked alone, then with every option added).
MODES = {
    "self": [],
    "plain": ["--draft", "none"],
    "gamma 0": ["--gamma", "0"],
    "snapkv": ["--draft-kv", "snapkv"],
    "full": ["--draft", "model", "--draft-checkpoint", "d", "--draft-kv", "full"],
    "budget -1": ["--draft", "model", "--draft-checkpoint", "d", "--draft-budget", "-1"],
    "lookup": ["--draft", "lookup"],
    "lookup+self": ["--draft", "lookup+self"],
    "sampling": ["--temperature", "0.7"],
    "random weights": ["--random-weights", "tiny"],
    "compare": ["--compare"],
    "out": ["--out", "o.jsonl"],
    "gamma auto": ["--gamma", "auto"],
}


def option_value(param: click.Option) -> list:
    """Arguments that give `param` explicitly with a harmless, valid value."""
    flag = max(param.opts, key=len)
    if param.is_flag:
        return [flag if not param.default or param.secondary_opts == [] else param.secondary_opts[0]]
    if isinstance(param.type, click.Choice):
        choices = [c for c in param.type.choices if c != param.default and c != "none"]
        return [flag, choices[0]]
    if isinstance(param.type, click.types.FloatParamType):
        return [flag, "0.5"]
    if isinstance(param.type, (click.types.IntParamType, click.types.IntRange)):
        return [flag, {"draft_budget": "64", "tp_size": "1"}.get(param.name, "2")]
    return [flag, {"gamma": "2", "draft_ranks": "0", "device": "cpu", "prompt": "hi"}.get(param.name, "x")]


@pytest.fixture
def said(monkeypatch):
    """What the command echoes (its notices), and no torchrun world."""
    lines = []
    monkeypatch.setattr(generate, "echo", lambda line, **kw: lines.append(line))
    monkeypatch.setattr(generate, "env_world_size", lambda: 1)
    return lines


def notices(args: list, said: list) -> list:
    """The notices of a command line, from the checks that run before any model is loaded."""
    said.clear()
    ctx = generate.main.make_context("gfm-generate", list(args))
    explicit = frozenset(n for n in ctx.params if ctx.get_parameter_source(n) == ParameterSource.COMMANDLINE)
    generate.check_options(generate.Options(**ctx.params), explicit)
    return [line for line in said if line.startswith("notice:")]


def test_every_option_is_classified():
    names = {p.name for p in generate.main.params if isinstance(p, click.Option)} - {"help"}
    assert names == set(generate.IGNORED_WHEN) | generate.ALWAYS_USED, (
        names ^ (set(generate.IGNORED_WHEN) | generate.ALWAYS_USED))
    assert not set(generate.IGNORED_WHEN) & generate.ALWAYS_USED


@pytest.mark.parametrize("param", [p for p in generate.main.params if isinstance(p, click.Option)
                                   and p.name not in ("help", "simulate_acceptance", "draft_ranks", "prompt_file",
                                                      "checkpoint")], ids=lambda p: p.name)
def test_each_option_is_used_or_noticed_in_every_mode(param, said):
    """In each mode an option is given: it is used (no notice), or one notice names it. An option
    the table can ignore is noticed in at least one mode; one always used is never noticed."""
    flag = max(param.opts, key=len)
    noticed_somewhere = False
    for mode, args in MODES.items():
        try:
            lines = notices(args + option_value(param), said)
        except (UserError, click.UsageError):
            continue  # a contradiction (an error of its own), not a silent drop
        mine = [line for line in lines if line.startswith(f"notice: {flag} is ignored")]
        assert len(mine) <= 1, (mode, lines)
        if param.name in generate.ALWAYS_USED:
            assert not mine, (mode, lines)
        noticed_somewhere |= bool(mine)
    if param.name in generate.IGNORED_WHEN:
        assert noticed_somewhere, f"{flag} is never noticed in any mode"


def test_repeats_without_compare_is_noticed(said):
    assert notices(["--repeats", "3"], said) == ["notice: --repeats is ignored without --compare"]
    assert notices(["--repeats", "3", "--compare"], said) == []
