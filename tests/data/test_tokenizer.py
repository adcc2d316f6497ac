"""Character tokenizer: round trips, single-token markers, special ids, save/load."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_selfjudge.data.prompts import format_response
from megatron_selfjudge.data.synthetic import make_synthetic_splits
from megatron_selfjudge.data.tokenizer import DEFAULT_CHARS, MARKERS, SPECIAL_TOKENS, CharTokenizer

TOK = CharTokenizer()
PIECES = st.sampled_from(list(DEFAULT_CHARS) + list(MARKERS))


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, max_size=60))
def test_decode_encode_round_trip(pieces):
    text = "".join(pieces)
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(TOK.unk_token_id < i < TOK.vocab_size for i in ids)  # never a special id
    assert len(ids) <= len(text)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(list(MARKERS) + list("0123456789+=-,")), max_size=30))
def test_each_marker_is_one_token(pieces):
    ids = TOK.encode("".join(pieces))
    # Digits and operators never combine into markers, so each piece is exactly one id.
    assert ids == [TOK.convert_tokens_to_ids([p])[0] for p in pieces]


def test_response_token_count():
    ids = TOK.encode(format_response("3+4=7", "7"))
    assert TOK.convert_ids_to_tokens(ids) == ["<think>", "3", "+", "4", "=", "7", "</think>",
                                              "\\boxed{", "7", "}"]


def test_special_ids_and_hf_shape():
    assert (TOK.pad_token_id, TOK.bos_token_id, TOK.eos_token_id, TOK.image_token_id,
            TOK.unk_token_id) == (0, 1, 2, 3, 4)
    assert TOK.vocab_size == len(TOK) == len(SPECIAL_TOKENS) + len(MARKERS) + len(DEFAULT_CHARS)
    assert TOK.encode("ab", add_special_tokens=True)[0] == TOK.bos_token_id
    ids = [TOK.bos_token_id] + TOK.encode("12") + [TOK.eos_token_id, TOK.pad_token_id]
    assert TOK.decode(ids, skip_special_tokens=True) == "12"
    assert TOK.decode(ids) == "<bos>12<eos><pad>"
    assert TOK.batch_decode([ids, ids[:2]], skip_special_tokens=True) == ["12", "1"]


def test_unknown_characters_and_bad_input():
    ids = TOK.encode("x\u4e00y")
    assert ids[1] == TOK.unk_token_id and TOK.decode(ids) == "x\ufffdy"
    # Literal special-token names in text are plain characters, never control ids.
    assert TOK.eos_token_id not in TOK.encode("<eos><image>")
    with pytest.raises(TypeError, match="text"):
        TOK.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([TOK.vocab_size])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.decode([-200])
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer(chars="aa")


def test_covers_every_synthetic_prompt_and_target():
    from megatron_selfjudge.data.prompts import FORMAT_INSTRUCTION, SHORT_INSTRUCTION, sft_target

    exs = make_synthetic_splits(seed=0, n_sft=0, n_unlabeled=0, n_test=16)["test"]
    for text in [FORMAT_INSTRUCTION, SHORT_INSTRUCTION] + [e.question for e in exs] + [sft_target(e) for e in exs]:
        assert TOK.unk_token_id not in TOK.encode(text), text


def test_save_load_identical(tmp_path):
    custom = CharTokenizer(chars="0123456789+=", markers=("<think>", "</think>", "\\boxed{", "<answer>"))
    path = custom.save(tmp_path / "tok.json")
    loaded = CharTokenizer.load(path)
    text = "<answer>1+2=3</think>"
    assert loaded.encode(text) == custom.encode(text) and loaded.vocab_size == custom.vocab_size
    TOK.save(tmp_path)  # a directory gets tokenizer.json
    assert CharTokenizer.load(tmp_path).encode("°π") == TOK.encode("°π")


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        CharTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CharTokenizer.load(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="format"):
        CharTokenizer.load(bad)
    payload = json.loads(TOK.save(tmp_path / "ok.json").read_text())
    payload["chars"] = 5
    bad.write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer.load(bad)
