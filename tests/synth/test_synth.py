"""`selfjudge synth`: the filters on crafted replies, the pipeline with a scripted engine, the written
data sets through `selfjudge data check`, argument errors, and the command on the embedded model."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from megatron_selfjudge.config import load_config, to_yaml
from megatron_selfjudge.data import cli as data_cli
from megatron_selfjudge.data.datasets import PromptRecord, load_records
from megatron_selfjudge.data.prompts import SHORT_INSTRUCTION
from megatron_selfjudge.megatron.models.family import build_family
from megatron_selfjudge.rollout.base import RolloutEngine, Trajectory
from megatron_selfjudge.synth import cli as synth_cli
from megatron_selfjudge.synth import filters, writer
from megatron_selfjudge.synth.pipeline import SynthSettings, Synthesizer
from megatron_selfjudge.synth.prompts import PROMPTS, parse_reply, prompt_style

REPO = Path(__file__).resolve().parents[2]


def box(x: str) -> str:
    return f"<think>.</think>\\boxed{{{x}}}"


# ---------------------------------------------------------------- parsing and well-formedness
def test_parse_tagged_reply_takes_the_last_closed_pair():
    text = "Sure. <question>first</question> or rather <question> What is x? </question> trailing"
    assert parse_reply(text, "stop", tagged=True) == (" What is x? ", None)
    # A closed pair survives a reply cut at the token limit after it.
    assert parse_reply("<question>Find x.</question> and now", "length", tagged=True) == ("Find x.", None)
    assert parse_reply("<question>Find the area of", "length", tagged=True) == (None, "truncated")
    assert parse_reply("Find the area of the circle.", "stop", tagged=True) == (None, "no_question")
    assert parse_reply("<question>Find", "stop", tagged=True) == (None, "no_question")


def test_parse_plain_reply():
    assert parse_reply("Question: Which bar is tallest?", "stop", tagged=False) == ("Which bar is tallest?", None)
    assert parse_reply("new problem - Find x.", "stop", tagged=False) == ("Find x.", None)
    assert parse_reply("Which bar is", "length", tagged=False) == (None, "truncated")


@pytest.mark.parametrize("question,reason", [
    ("", "empty"),
    ("What is 2+3? \\boxed{5}", "leaks_answer"),
    ("<think>count them</think> How many?", "leaks_answer"),
    ("How many <answer>3</answer>", "leaks_answer"),
    ("Find x. <question>", "stray_tags"),
    ("What is \ufffd?", "undecodable"),
    ("?? ... !!", "no_text"),
    ("Find x", "too_short"),
    ("How long is " + "a" * 100, "too_long"),
    ("Find the value of x.", None),
])
def test_check_question(question, reason):
    assert filters.check_question(question, min_chars=8, max_chars=60) == reason


def test_clean_question_drops_image_tags_and_extra_space():
    assert filters.clean_question("<image>  What is\n the area? <image2>") == "What is the area?"


# ---------------------------------------------------------------- near-duplicates
def test_similarity_by_hand():
    # Trigrams {abc, bcd} and {abc, bce}: one shared of three.
    assert filters.similarity("abcd", "abce") == pytest.approx(1 / 3)
    # Case, sentence punctuation, image tags and spacing do not make a question new.
    assert filters.similarity("<image>What is  the Area?", "what is the area") == 1.0
    # One symbol changes the question: "find x" / "find y" share 3 of 5 trigrams.
    assert filters.similarity("Find x.", "Find y.") == pytest.approx(3 / 5)
    assert filters.similarity("ab", "ab") == 1.0 and filters.similarity("ab", "cd") == 0.0


def test_duplicate_index_scopes():
    index = filters.DuplicateIndex(0.85)
    index.add("How many digits are shown?", scope="image-a")
    assert index.duplicate("how many digits are shown", scope="image-a")
    assert not index.duplicate("how many digits are shown", scope="image-b")
    assert not index.duplicate("How many colours are used?", scope="image-a")
    with pytest.raises(ValueError):
        filters.DuplicateIndex(0.0)


def test_duplicate_index_matches_brute_force():
    # The size pre-filter must never miss a pair the plain pairwise comparison finds.
    rng = random.Random(0)
    words = ["find", "x", "y", "the", "area", "of", "angle", "abc", "what", "is", "length", "side"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(300)]
    for threshold in (0.5, 0.85):
        index, kept = filters.DuplicateIndex(threshold), []
        for text in texts:
            expected = any(filters.similarity(text, k) >= threshold for k in kept)
            assert index.duplicate(text) == expected, (text, threshold)
            if not expected:
                index.add(text)
                kept.append(text)


# ---------------------------------------------------------------- answerable
def test_agreement_from_hand_made_samples():
    vote = filters.agreement([box("3"), box("3"), box("3"), box("4")], "normalized", 5.0)
    assert (vote.answer, vote.agreement, vote.samples) == ("3", 0.75, 4)
    assert filters.answerable(vote, 0.75) and not filters.answerable(vote, 0.8)
    # Answers without a box count in the denominator; equal numbers in other notations share a class.
    vote = filters.agreement([box("0.5"), box("\\frac{1}{2}"), "no answer", box("2")], "symbolic", 30.0)
    assert (vote.answer, vote.agreement) == ("0.5", 0.5)
    # A tie goes to the first seen class.
    vote = filters.agreement([box("2"), box("1"), box("1"), box("2")], "exact", 5.0)
    assert (vote.answer, vote.agreement) == ("2", 0.5)
    # No sample answered: unanswerable at any threshold, 0 included.
    vote = filters.agreement(["nothing", "\\boxed{}"], "exact", 5.0)
    assert vote.answer is None and vote.agreement == 0.0 and not filters.answerable(vote, 0.0)


# ---------------------------------------------------------------- the pipeline, with a scripted engine
class ScriptedSynthEngine(RolloutEngine):
    """Replies chosen by `respond(prompt text, uid, n) -> [(text, finish_reason)] * n`; records prompts."""

    def __init__(self, tokenizer, respond):
        self.tokenizer, self.respond, self.prompts, self.uids = tokenizer, respond, [], []

    def generate(self, requests, sampling):
        out = []
        for req in requests:
            # Negative ids are image placeholders; the rest decode to the prompt text.
            text = self.tokenizer.decode([i for i in req.prompt_ids if i >= 0], skip_special_tokens=True)
            self.prompts.append(text)
            self.uids.append(req.uid)
            replies = self.respond(text, req.uid, sampling.n)
            assert len(replies) == sampling.n
            out += [Trajectory(uid=req.uid, sample_index=k, prompt_ids=req.prompt_ids, response_ids=[5],
                               logprobs=torch.zeros(1), finish_reason=finish, text=reply)
                    for k, (reply, finish) in enumerate(replies)]
        return out


def _solid(color) -> Image.Image:
    return Image.new("RGB", (32, 32), color)


A, B, C = (220, 30, 30), (30, 150, 50), (30, 70, 220)
# source question -> (image, the policy's new question or (reply, finish reason))
SOURCES = [
    ("What is the sum of the two digits?", A, "How many digits are shown?"),        # kept, answer 2
    ("What is the difference of the digits?", B, "What is the difference of the digits"),  # dup of source
    ("Which digit is on the left?", A, "How many digits are shown"),                 # dup of row 0 (image A)
    ("Which digit is on the right?", C, "How many colours are used?"),              # unanswerable
    ("What is the larger digit?", B, "<think>2+3=5</think>\\boxed{5}"),              # leaks the answer
    ("What is the smaller digit?", B, ("Which digit is bi", "length")),              # truncated
    ("What is the product of the digits?", C, "Question: Which digit is larger?"),  # kept at 3/4
    ("Which digit is odd?", C, "How many digits are shown?"),                        # kept (image C), dup (all)
    ("x" * 80, A, "never asked"),                                                    # prompt over 64 tokens
    ("What is the sum?", B, "Is it?"),                                               # too short
]
ANSWERS = {  # the policy's 4 sampled responses to each new question
    "How many digits are shown?": [box("2")] * 4,
    "How many colours are used?": [box("1"), box("2"), box("3"), "none"],
    "Which digit is larger?": [box("7")] * 3 + ["no box"],
}


def _records(sources=SOURCES) -> list[PromptRecord]:
    return [PromptRecord(uid=f"src:{i}", images=[_solid(color)], question=q, answer=None, source_file="mem", row=i)
            for i, (q, color, _) in enumerate(sources)]


def _respond(sources=SOURCES, answers=ANSWERS):
    by_question = {q: reply for q, _, reply in sources}
    short = PROMPTS["short"]

    def respond(prompt, uid, n):
        if prompt.endswith(SHORT_INSTRUCTION):  # an answer request: the run's instruction follows the question
            return [(t, "stop") for t in answers[prompt[:-len(SHORT_INSTRUCTION)].strip()]]
        source = prompt[:-len(short.in_context.format(question=""))].strip()
        reply = by_question[source]
        return [reply if isinstance(reply, tuple) else (reply, "stop")] * n
    return respond


@pytest.fixture(scope="module")
def family():
    return build_family(load_config(None))  # the embedded tiny-llava (character tokenizer, 64-token prompts)


def _synthesizer(family, respond, **overrides) -> tuple[Synthesizer, ScriptedSynthEngine]:
    engine = ScriptedSynthEngine(family.tokenizer, respond)
    settings = dict(strategy="in-context", samples=4, temperature=1.0, top_p=1.0, max_answer_tokens=8, seed=0,
                    equivalence="normalized", timeout=5.0, batch_size=8, agreement=0.75)
    settings.update(overrides)
    synth = Synthesizer(engine, family, SynthSettings(**settings), PROMPTS["short"],
                        answer_instruction=SHORT_INSTRUCTION, max_prompt_len=64)
    return synth, engine


def test_pipeline_buckets_every_candidate(family):
    synth, engine = _synthesizer(family, _respond())
    rows = []
    counts = synth.run(_records(), rows.append)
    assert (counts.sources, counts.prompt_too_long, counts.generated) == (10, 1, 9)
    assert dict(counts.malformed) == {"leaks_answer": 1, "truncated": 1, "too_short": 1}
    assert (counts.duplicate_source, counts.duplicate_other, counts.unanswerable, counts.kept) == (1, 1, 1, 3)
    assert [(r.source_uid, r.question, r.answer, r.agreement) for r in rows] == [
        ("src:0", "How many digits are shown?", "2", 1.0),
        ("src:6", "Which digit is larger?", "7", 0.75),
        ("src:7", "How many digits are shown?", "2", 1.0)]
    assert all(r.strategy == "in-context" for r in rows)
    # In-context prompts carry the source question; 9 synthesis prompts (the long one never went out),
    # then one answer prompt per question that passed the filters before the vote.
    assert engine.prompts[0] == "What is the sum of the two digits? Another question:"
    assert len(engine.prompts) == 9 + 4
    assert counts.examples["malformed.leaks_answer"] == ["<think>2+3=5</think>\\boxed{5}"]


def test_pipeline_scope_and_threshold(family):
    synth, _ = _synthesizer(family, _respond(), dedup_scope="all")
    counts = synth.run(_records(), lambda row: None)
    assert (counts.duplicate_other, counts.kept) == (2, 2)  # row 7 repeats row 0's question on another image
    synth, _ = _synthesizer(family, _respond(), agreement=0.8)
    counts = synth.run(_records(), lambda row: None)
    assert (counts.unanswerable, counts.kept) == (2, 2)  # 3 of 4 votes no longer suffice
    # Several replies per source: the second copy of a reply is a duplicate of the first.
    synth, _ = _synthesizer(family, _respond(), per_source=2)
    counts = synth.run(_records(), lambda row: None)
    # Second copies of rows 0, 3, 6, 7 and both copies of row 2 (row 3's unanswerable first copy is indexed).
    assert counts.generated == 18 and counts.duplicate_other == 6
    counts.check(per_source=2)


def test_requests_do_not_depend_on_the_batch_size(family):
    # uids seed the samples (rollout/sampling.row_seed): the same uid must mean the same question.
    runs = []
    for batch_size in (8, 4, 1):
        synth, engine = _synthesizer(family, _respond(), batch_size=batch_size, per_source=2)
        rows = []
        synth.run(_records(), rows.append)
        runs.append((sorted(zip(engine.uids, engine.prompts)), [(r.source_uid, r.question) for r in rows]))
    assert runs[0] == runs[1] == runs[2]


def test_direct_prompts_do_not_show_the_source_question(family):
    questions = {"src0": "How many digits are there?", "src1": "What colour is the image?"}

    def respond(prompt, uid, n):
        if prompt.endswith(SHORT_INSTRUCTION):
            return [(box("2"), "stop")] * n
        assert prompt == PROMPTS["short"].direct
        return [(questions[uid], "stop")] * n

    synth, engine = _synthesizer(family, respond, strategy="direct")
    rows = []
    synth.run(_records(SOURCES[:2]), rows.append)
    assert [(r.question, r.strategy) for r in rows] == [("How many digits are there?", "direct"),
                                                         ("What colour is the image?", "direct")]


def test_full_style_reads_tagged_replies(family):
    # The style for instruction-following models: only a closed <question> pair counts.
    replies = {"src0": "Sure! <question>What is the area of the shaded part?</question>",
               "src1": "What is the area of the shaded part?"}
    engine = ScriptedSynthEngine(family.tokenizer, lambda prompt, uid, n: (
        [(box("12"), "stop")] * n if uid.startswith("q") else [(replies[uid], "stop")] * n))
    settings = SynthSettings(strategy="in-context", samples=2, temperature=1.0, top_p=1.0, max_answer_tokens=8,
                             seed=0, equivalence="exact", timeout=5.0, batch_size=4)
    synth = Synthesizer(engine, family, settings, PROMPTS["full"], answer_instruction="", max_prompt_len=1000)
    rows = []
    counts = synth.run(_records(SOURCES[:2]), rows.append)
    assert [(r.question, r.answer) for r in rows] == [("What is the area of the shaded part?", "12")]
    assert dict(counts.malformed) == {"no_question": 1}
    assert engine.prompts[0] == PROMPTS["full"].render("in-context", SOURCES[0][0])


def test_prompt_styles():
    assert prompt_style("auto", "short") is PROMPTS["short"] and prompt_style("auto", "full") is PROMPTS["full"]
    full = PROMPTS["full"].render("in-context", "  Find x. ")
    assert "Find x." in full and "<question>" in full and PROMPTS["full"].tagged
    with pytest.raises(ValueError):
        PROMPTS["full"].render("sideways", "q")


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_written_rows_pass_data_check(family, tmp_path, suffix):
    synth, _ = _synthesizer(family, _respond())
    out = tmp_path / "sub" / f"synth{suffix}"
    out.parent.mkdir()
    sink = writer.RowWriter(out)
    synth.run(_records(), sink.write)
    sink.close(commit=True)
    assert not list(out.parent.glob("*.part"))
    assert data_cli.main(["check", str(out)]) == 0
    loaded = load_records(out)
    assert [(r.question, r.answer) for r in loaded] == [
        ("How many digits are shown?", "2"), ("Which digit is larger?", "7"), ("How many digits are shown?", "2")]
    for rec, color in zip(loaded, (A, C, C)):  # the source row's pixels, unchanged
        assert np.array_equal(np.asarray(rec.images[0]), np.asarray(_solid(color)))
    if suffix == ".jsonl":
        assert sorted(p.name for p in writer.images_dir(out).iterdir()) == [f"00000{i}_0.png" for i in range(3)]


def test_replacing_an_output_replaces_its_images(family, tmp_path):
    # What --force does: the new set's files only, none of the old set's images left beside it.
    out = tmp_path / "s.jsonl"
    for sources in (SOURCES, SOURCES[:1]):
        synth, _ = _synthesizer(family, _respond())
        sink = writer.RowWriter(out)
        synth.run(_records(sources), sink.write)
        sink.close(commit=True)
    assert [p.name for p in writer.images_dir(out).iterdir()] == ["000000_0.png"]
    assert len(load_records(out)) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl", "s_images"]


def test_discarded_output_leaves_nothing(tmp_path):
    for suffix in writer.FORMATS:
        out = tmp_path / f"x{suffix}"
        sink = writer.RowWriter(out)
        sink.close(commit=False)
        assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- argument errors (before any model is built)
@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A run directory whose files pass `locate` (no loadable weights: for argument checks only)."""
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_00000001"
    (step / "dist").mkdir(parents=True)
    for name in ("checkpoint.json", "trainer_state.json", "dist/metadata.json"):
        (step / name).write_text("{}")
    (run / "config.yaml").write_text(to_yaml(load_config(None)))
    data = tmp_path / "data.jsonl"
    _solid(A).save(tmp_path / "a.png")
    data.write_text(json.dumps({"images": ["a.png"], "problem": "<image>What is the sum?"}) + "\n")
    return run


def _synth_args(run: Path, *extra: str, out: str = "out.parquet") -> list[str]:
    return ["--checkpoint", str(run), "--data", str(run.parent / "data.jsonl"), "--strategy", "in-context",
            "--out", str(run.parent / out), *extra]


@pytest.mark.parametrize("extra,out,message", [
    ((), "out.csv", "unknown format '.csv'"),
    (("--min-chars", "50", "--max-chars", "10"), "out.parquet", "min chars (50) exceeds max chars (10)"),
    (("--max-similarity", "0"), "out.parquet", "max similarity must be in (0, 1]"),
    (("--limit", "1", "--strategy", "direct"), "missing/out.parquet", "does not exist"),
    (("--backend", "nope"), "out.parquet", "--backend 'nope' is not a rollout engine; known: megatron"),
])
def test_bad_arguments_exit_2_in_one_line(fake_run, capsys, extra, out, message):
    assert synth_cli.main(_synth_args(fake_run, *extra, out=out)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_argparse_errors_are_one_line(fake_run, capsys):
    for extra in (("--agreement", "1.5"), ("--n", "0"), ("--strategy", "sideways")):
        with pytest.raises(SystemExit) as exc:
            synth_cli.main(_synth_args(fake_run, *extra))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("selfjudge synth: error:") and err.count("\n") == 1, err


def test_missing_inputs_and_existing_output(fake_run, capsys):
    args = _synth_args(fake_run)
    args[args.index("--data") + 1] = str(fake_run.parent / "nope.jsonl")
    assert synth_cli.main(args) == 2 and "nope.jsonl: file not found" in capsys.readouterr().err
    args = _synth_args(fake_run)
    args[1] = str(fake_run.parent)  # not a run directory
    assert synth_cli.main(args) == 2 and "not a run directory" in capsys.readouterr().err
    (fake_run.parent / "out.summary.json").write_text("{}")
    assert synth_cli.main(_synth_args(fake_run)) == 2
    err = capsys.readouterr().err
    assert "out.summary.json already exists (pass --force" in err and err.count("\n") == 1
    assert (fake_run.parent / "out.summary.json").read_text() == "{}"


def test_top_level_cli_passes_options_through(fake_run, capsys):
    from megatron_selfjudge.cli import main

    assert main(["synth", *_synth_args(fake_run, out="out.csv")]) == 2
    assert "unknown format" in capsys.readouterr().err


# ---------------------------------------------------------------- the command on the embedded model
def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        env.pop(key, None)
    return env


# A warm start that teaches the tiny policy to write questions (data.synthetic_sft_ask), then one UPT
# step: small enough for CI (about a minute and a half on two cores), long enough that most replies are
# well-formed questions (its answers are still unsteady: README's 1000-step warm start answers them).
WRITER_TRAINING = ["data.synthetic_sft=256", "data.synthetic_sft_ask=256", "trainer.sft_steps=400",
                   "optim.sft_schedule=cosine", "optim.sft_warmup_steps=20", "optim.sft_min_lr=1e-4",
                   "trainer.max_steps=1", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2", "rollout.n=2",
                   "data.synthetic_unlabeled=16", "data.synthetic_test=2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The embedded tiny default warm-started to write questions, and unlabeled rows of its task."""
    root = tmp_path_factory.mktemp("synth_run")
    run = root / "run"
    cmd = [sys.executable, "-m", "megatron_selfjudge.cli", "train", *WRITER_TRAINING, f"trainer.run_dir={run}"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert data_cli.main(["synthetic", "--out", str(root / "data"), "--sft", "2", "--unlabeled", "12",
                          "--test", "2", "--families", "add"]) == 0
    return run


def _synth_cmd(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(run), "--data", str(run.parent / "data" / "train_unlabeled.parquet"),
            "--strategy", "in-context", "--out", str(out), *extra]


@pytest.mark.slow
def test_synth_on_the_embedded_model(trained, tmp_path, capsys):
    out = tmp_path / "synth.parquet"
    cmd = [sys.executable, "-m", "megatron_selfjudge.cli", "synth", *_synth_cmd(trained, out, "--n", "4", "--agreement", "0.25")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(writer.summary_path(out).read_text())
    c = summary["counts"]
    assert c["sources"] == 12 and c["generated"] == 12 - c["prompt_too_long"]
    assert c["generated"] == c["malformed_total"] + c["duplicate_source"] + c["duplicate_other"] \
        + c["unanswerable"] + c["kept"]
    assert summary["rows"] == c["kept"] and summary["step"] == 1 and summary["settings"]["samples"] == 4
    assert "kept and written" in proc.stdout
    # The policy writes questions that pass every filter (at a low --agreement: this short warm start
    # answers them unsteadily; the vote itself is tested on crafted samples above).
    assert c["kept"] >= 6, c
    assert data_cli.main(["check", str(out)]) == 0
    loaded = load_records(out)
    source = {r.uid: r for r in load_records(trained.parent / "data" / "train_unlabeled.parquet").records}
    lines = pq.read_table(out).to_pylist()
    assert len(loaded) == c["kept"] and all(r.answer is not None for r in loaded)
    for rec, line in zip(loaded, lines):
        assert rec.question != source[line["source_uid"]].question
    # Most kept questions are ones the task's images answer (the warm start's other questions), word for word.
    asked = [r.question for r in loaded]
    assert sum(q in ("What is the left digit?", "What is the right digit?") for q in asked) >= len(asked) / 2, asked
    # Run again: the existing output is kept (one line, exit 2) unless --force.
    before = out.read_bytes()
    capsys.readouterr()
    assert synth_cli.main(cmd[4:]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1
    assert out.read_bytes() == before


@pytest.mark.slow
def test_damaged_checkpoint_is_one_line(trained, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("tensorboard"))
    state = run / "checkpoints" / "step_00000001" / "trainer_state.json"
    state.write_text(state.read_text().replace("step", "stop", 1))  # same size, other bytes
    cmd = ["--checkpoint", str(run), "--data", str(trained.parent / "data" / "train_unlabeled.parquet"),
           "--strategy", "direct", "--out", str(tmp_path / "o.parquet")]
    proc = subprocess.run([sys.executable, "-m", "megatron_selfjudge.cli", "synth", *cmd],
                          env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("selfjudge synth: no intact checkpoint to load under") and "SHA-256" in last, last
    assert not (tmp_path / "o.parquet").exists()


_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from megatron_selfjudge.cli import main
from megatron_selfjudge.data.prompts import SHORT_INSTRUCTION
from megatron_selfjudge.data.tokenizer import CharTokenizer
from megatron_selfjudge.rollout.base import register_engine
from test_synth import ScriptedSynthEngine, box

def respond(prompt, uid, n):
    if prompt.endswith(SHORT_INSTRUCTION):
        return [(box("4"), "stop")] * n if "odd" not in prompt else [(box(str(k)), "stop") for k in range(n)]
    i = int(uid[3:])
    return [("Is digit %d odd?" % i if i % 3 == 0 else "How tall is shape number %d?" % i, "stop")] * n

def factory(model, tokenizer, max_batch_size):
    assert sum(p.numel() for p in model.parameters()) > 0  # the run's policy, loaded
    return ScriptedSynthEngine(tokenizer, respond)

register_engine("scripted-synth", factory)
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_synth_command_writes_the_kept_rows(trained, tmp_path):
    out = tmp_path / "synth.jsonl"
    driver = _DRIVER.format(tests=str(Path(__file__).parent))
    cmd = [sys.executable, "-c", driver, "synth", *_synth_cmd(trained, out, "--backend", "scripted-synth",
                                                              "--limit", "9", "--n", "4")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Rows 0, 3, 6 ask an "odd" question that the policy answers 0, 1, 2, 3: agreement 1/4 < 0.5.
    summary = json.loads(writer.summary_path(out).read_text())
    assert (summary["counts"]["kept"], summary["counts"]["unanswerable"], summary["rows"]) == (6, 3, 6)
    assert data_cli.main(["check", str(out)]) == 0
    loaded = load_records(out)
    assert [r.question for r in loaded] == [f"How tall is shape number {i}?" for i in (1, 2, 4, 5, 7, 8)]
    assert {r.answer for r in loaded} == {"4"}
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    source = load_records(trained.parent / "data" / "train_unlabeled.parquet").records
    assert [line["source_uid"] for line in lines] == [source[i].uid for i in (1, 2, 4, 5, 7, 8)]
    for rec, i in zip(loaded, (1, 2, 4, 5, 7, 8)):  # each row shows its source row's image
        assert np.array_equal(np.asarray(rec.images[0]), np.asarray(source[i].images[0]))
    assert all(line["problem"].startswith("<image>") and line["agreement"] == 1.0 for line in lines)
    # data.train takes the file as it is, and every prompt fits the run's rollout.max_prompt_len.
    from megatron_selfjudge.data.task import load_task

    cfg = load_config(None, [f"data.train={out}", "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2"])
    task, fam = load_task(cfg), build_family(cfg)
    assert [task.train[i].question for i in range(len(task.train))] == [r.question for r in loaded]
    for i in range(len(task.train)):
        rec = task.train[i]
        ids = fam.prompt_ids(rec.question, fam.num_images(rec.images), SHORT_INSTRUCTION)
        assert len(ids) <= cfg.rollout.max_prompt_len
