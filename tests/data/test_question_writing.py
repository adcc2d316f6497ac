"""Question-writing warm-start pairs (data.synthetic_sft_ask): the cues `selfjudge synth` sends, and
targets that are other questions of the same image with their right solutions."""
import pytest

from megatron_selfjudge.config import ConfigError, load_config
from megatron_selfjudge.data.prompts import format_response
from megatron_selfjudge.data.synthetic import make_synthetic_splits
from megatron_selfjudge.data.task import PROMPT_KIND, load_task, question_writing_pairs
from megatron_selfjudge.synth.prompts import PROMPTS, parse_reply


@pytest.fixture(scope="module")
def examples():
    return make_synthetic_splits(seed=3, n_sft=16, n_unlabeled=1, n_test=0)["train_sft"]


@pytest.mark.parametrize("instruction,style", [("short", "short"), ("full", "full")])
def test_three_pairs_per_example_in_the_synthesis_style(examples, instruction, style):
    pairs = question_writing_pairs(examples, seed=0, instruction=instruction)
    assert len(pairs) == 3 * len(examples)
    prompt = PROMPTS[style]
    for k, ex in enumerate(examples):
        (ic, ic_target), (direct, direct_target), (asked, solution) = pairs[3 * k:3 * k + 3]
        # The cues are the very texts the synthesis command sends, with no answer instruction after them.
        assert ic.question == prompt.render("in-context", ex.question)
        assert direct.question == prompt.render("direct", ex.question)
        assert ic.meta[PROMPT_KIND] == direct.meta[PROMPT_KIND] == "ask"
        assert ic.images == direct.images == asked.images == [ex.image]
        # What the synthesis command would read out of each target reply.
        new, reason = parse_reply(ic_target, "stop", prompt.tagged)
        picked, _ = parse_reply(direct_target, "stop", prompt.tagged)
        assert reason is None and new != ex.question
        alternatives = {q: (a, r) for q, a, r in ex.alternatives}
        assert new in alternatives and picked in {ex.question, *alternatives}
        # The asked question is answered with its own trace and answer, under the run's instruction.
        assert asked.question == new and PROMPT_KIND not in asked.meta
        assert asked.answer == alternatives[new][0]
        assert solution == format_response(alternatives[new][1], alternatives[new][0])


def test_pairs_depend_on_the_seed_only(examples):
    a = question_writing_pairs(examples, seed=0, instruction="short")
    assert [t for _, t in a] == [t for _, t in question_writing_pairs(examples, seed=0, instruction="short")]
    assert [t for _, t in a] != [t for _, t in question_writing_pairs(examples, seed=1, instruction="short")]


def test_config_adds_them_to_the_warm_start():
    base = ["data.synthetic_sft=8", "data.synthetic_unlabeled=16", "data.synthetic_test=2",
            "trainer.prompts_per_step=4", "trainer.mini_batch_prompts=2"]
    plain = load_task(load_config(None, base))
    task = load_task(load_config(None, base + ["data.synthetic_sft_ask=5"]))
    assert len(plain.sft) == 8 and len(task.sft) == 8 + 15
    assert [r.uid for r, _ in task.sft[:8]] == [r.uid for r, _ in plain.sft]
    with pytest.raises(ConfigError, match=r"data.synthetic_sft_ask=9 is out of range: must be in \[0, "
                                          r"data.synthetic_sft=8\]"):
        load_config(None, base + ["data.synthetic_sft_ask=9"])
