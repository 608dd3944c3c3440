"""The batch run as a Python user drives it (Engine.run_batch / BatchRun), tested as the CLI is:
rows in input order, resume to the uninterrupted file, refusals that name the parameter, one run
per output file, leftover replica parts kept, and a budget decided by the whole input."""
import json
from pathlib import Path

import pytest

import gpt_fast_magicdec as gfm
from gpt_fast_magicdec.errors import ParameterError, UserError
from gpt_fast_magicdec.locks import output_lock
from gpt_fast_magicdec.output import JobOutput, part_path, row_problem

ROOT = Path(__file__).resolve().parents[1]
PASSAGE = (ROOT / "tests" / "data" / "long_passage.txt").read_text()
TEXTS = [PASSAGE[i * 150:i * 150 + 200 + 23 * i] for i in range(6)]
DRAFT = gfm.DraftConfig(kind="self", budget=32, sink=4, gamma=3)
OPTIONS = dict(slots=2, draft=DRAFT)


@pytest.fixture(scope="module")
def engine(bundled_checkpoints):
    engine, _ = gfm.load_engine(bundled_checkpoints[0], device="cpu", attention="torch")
    return engine


@pytest.fixture(scope="module")
def whole(engine, tmp_path_factory):
    """The uninterrupted run's file, and its result."""
    out = tmp_path_factory.mktemp("whole") / "o.jsonl"
    result = engine.run_batch(TEXTS, 10, out=out, **OPTIONS)
    return out, result


def lines(path: Path) -> list:
    return path.read_text().splitlines()


def test_rows_come_in_input_order_with_text_and_ids(whole, engine):
    out, result = whole
    rows = [json.loads(line) for line in lines(out)]
    assert [r["index"] for r in rows] == list(range(len(TEXTS))) and all(row_problem(r) is None for r in rows)
    assert [r["prompt"] for r in rows] == TEXTS
    assert [r["completion_ids"] for r in rows] == [result.completions[i].tokens for i in range(len(TEXTS))]
    assert rows[0]["completion"] == engine.tokenizer.decode(rows[0]["completion_ids"])
    assert rows[0]["options"]["max_new_tokens"] == 10 and rows[0]["options"]["gamma"] == 3
    assert (result.done_before, result.written, result.problem) == (0, len(TEXTS), None)
    assert "throughput:" in "\n".join(result.stats.summary_lines())
    assert not list(out.parent.glob(".o.jsonl*"))  # no lock or temporary file left behind


def test_a_resumed_run_ends_in_the_uninterrupted_file(whole, engine, tmp_path):
    out, _ = whole
    cut = tmp_path / "o.jsonl"
    kept = lines(out)
    cut.write_text("\n".join([kept[4], kept[1], kept[2]]) + "\n" + kept[3][:40])  # a crash mid-write
    result = engine.run_batch(TEXTS, 10, out=cut, resume=True, **OPTIONS)
    assert (result.done_before, result.written) == (3, 3)
    assert cut.read_bytes() == out.read_bytes()
    again = engine.run_batch(TEXTS, 10, out=cut, resume=True, **OPTIONS)  # nothing left: nothing generated
    assert (again.done_before, again.written, again.runs) == (6, 0, []) and cut.read_bytes() == out.read_bytes()


def test_leftover_replica_parts_are_kept_by_a_single_process_resume(whole, engine, tmp_path):
    """A replica job killed mid-way, resumed by one process: the parts' rows end up in the file."""
    out, _ = whole
    target = tmp_path / "o.jsonl"
    kept = lines(out)
    target.write_text(kept[0] + "\n")
    part_path(target, 0).write_text(kept[2] + "\n" + kept[4] + "\n")
    part_path(target, 1).write_text(kept[1] + "\n")
    result = engine.run_batch(TEXTS, 10, out=target, resume=True, **OPTIONS)
    assert (result.done_before, result.written) == (4, 2)
    assert target.read_bytes() == out.read_bytes() and not list(tmp_path.glob("o.jsonl.part*"))


@pytest.mark.parametrize("change, parameter", [(dict(max_new_tokens=11), "max_new_tokens"),
                                               (dict(draft=gfm.DraftConfig(kind="self", budget=32, sink=4, gamma=2)),
                                                "gamma"),
                                               (dict(draft=gfm.DraftConfig(kind="lookup")), "kind"),
                                               (dict(sampling=gfm.SamplingParams(temperature=0.7)), "temperature")])
def test_resume_with_other_options_names_them(whole, engine, tmp_path, change, parameter):
    out, _ = whole
    copy = tmp_path / "o.jsonl"
    copy.write_bytes(out.read_bytes())
    args = dict(OPTIONS, max_new_tokens=10)
    args.update(change)
    with pytest.raises(ParameterError) as err:
        engine.run_batch(TEXTS, out=copy, resume=True, **args)
    assert parameter in err.value.parameters and "other options" in str(err.value)
    assert copy.read_bytes() == out.read_bytes()


def test_resume_refuses_changed_removed_or_reordered_prompts(whole, engine, tmp_path):
    out, _ = whole
    copy = tmp_path / "o.jsonl"
    for prompts, said in ((TEXTS[:4], "only 4 prompts"), (TEXTS[::-1], "another prompt text"),
                          ([TEXTS[0] + "!"] + TEXTS[1:], "prompt 0 was written for another prompt")):
        copy.write_bytes(out.read_bytes())
        with pytest.raises(ParameterError, match=said):
            engine.run_batch(prompts, 10, out=copy, resume=True, **OPTIONS)
        assert copy.read_bytes() == out.read_bytes()


def test_added_prompts_are_generated_on_resume(whole, engine, tmp_path):
    out, _ = whole
    copy = tmp_path / "o.jsonl"
    copy.write_bytes(out.read_bytes())
    result = engine.run_batch(TEXTS + ["One more prompt"], 10, out=copy, resume=True, **OPTIONS)
    assert (result.done_before, result.written) == (6, 1)
    assert lines(copy)[:6] == lines(out) and json.loads(lines(copy)[6])["index"] == 6


def test_an_existing_out_or_one_in_use_is_refused(whole, engine, tmp_path):
    out, _ = whole
    with pytest.raises(ParameterError) as err:
        engine.run_batch(TEXTS, 10, out=out, **OPTIONS)  # no resume: never replaced
    assert {"out", "resume"} <= set(err.value.parameters)
    busy = tmp_path / "busy.jsonl"
    with output_lock(busy, "--out", "held by this test"):
        with pytest.raises(UserError, match="another generation job is writing it"):
            engine.run_batch(TEXTS, 10, out=busy, **OPTIONS)
    assert not busy.exists()


def test_a_default_budget_is_decided_by_the_whole_input(engine, tmp_path):
    """Resuming after the short prompt finished must not give the long ones a larger draft budget
    (a sampled completion depends on the draft)."""
    prompts = [TEXTS[0][:60], PASSAGE[:4000]]
    output = JobOutput(tmp_path / "o.jsonl")
    run = gfm.BatchRun(engine, prompts, output, draft=gfm.DraftConfig(kind="self"))
    shortest = len(engine.tokenizer.encode(prompts[0]))
    assert run.draft.budget == gfm.DraftConfig(kind="self").for_context(shortest).budget < 512
    output.release()


def test_bad_prompts_name_the_parameter(engine):
    with pytest.raises(ParameterError, match="all texts or all token-id lists"):
        gfm.BatchRun(engine, ["text", [1, 2]])
    with pytest.raises(ParameterError, match="prompt 1 is empty"):
        gfm.BatchRun(engine, [[1, 2], []])
