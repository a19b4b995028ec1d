"""Task specs, JSONL loading and its errors, few-shot subsets, and tokenization with truncation."""

from __future__ import annotations

import json

import pytest

from conftest import SPECS, make_tokenizer
from mpt_edge.tasks import TaskError, TaskSpec, UnknownTaskError, few_shot, load_examples, load_task, write_task
from mpt_edge_runtime.text import TextError, encode_example, special_tokens


def test_spec_checks_its_fields():
    with pytest.raises(TaskError, match="name"):
        TaskSpec("Bad Name", ("a", "b"))
    with pytest.raises(TaskError, match="kind"):
        TaskSpec("t", ("a", "b"), kind="regress")
    with pytest.raises(TaskError, match="at least two distinct"):
        TaskSpec("t", ("a", "a"))
    with pytest.raises(TaskError, match="names no field"):
        TaskSpec("t", ("a", "b"), template="no fields here")
    with pytest.raises(TaskError, match="verbalizers"):
        TaskSpec("t", ("a", "b"), verbalizers=("x",))
    pair = TaskSpec("nli", ("yes", "no"), template="{premise} ? {hypothesis}")
    assert pair.fields == ("premise", "hypothesis")
    assert TaskSpec.from_json(json.loads(json.dumps(pair.to_json()))) == pair


def test_write_and_load_round_trip(tmp_path):
    spec = SPECS["polarity"]
    write_task(tmp_path / "p", spec, {"train": [{"text": "good film", "label": "positive"},
                                                {"text": "bad plot", "label": "negative"}]})
    task = load_task(tmp_path / "p", "train")
    assert task.spec == spec and [e.label for e in task.examples] == [1, 0]
    assert task.examples[0].fields == {"text": "good film"}


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok", "label": "positive"}\n{"text": "broken", \n', r"data.jsonl:2: malformed JSON"),
    ('{"text": "ok", "label": "neutral"}\n', r"data.jsonl:1: label 'neutral' is not in task 'polarity'"),
    ('{"label": "positive"}\n', r"data.jsonl:1: missing field\(s\) \['text'\]"),
    ('["text", "positive"]\n', r"data.jsonl:1: expected a JSON object"),
    ("\n\n", r"no examples; the file is empty"),
    ("", r"no examples; the file is empty"),
])
def test_bad_jsonl_gives_file_line_and_reason(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_examples(path, SPECS["polarity"])


def test_missing_task_files_are_named(tmp_path):
    with pytest.raises(TaskError, match="no task spec"):
        load_task(tmp_path, "train")


def test_unknown_task_error_lists_known_tasks():
    err = UnknownTaskError("sentiment", ["polarity", "topic"])
    assert "unknown task 'sentiment'" in str(err) and "polarity, topic" in str(err)


def test_few_shot_takes_k_per_class_deterministically():
    from conftest import synthetic_task

    task = synthetic_task("topic", 60)
    small = few_shot(task, 4, seed=1)
    assert sorted(e.label for e in small.examples) == [0] * 4 + [1] * 4 + [2] * 4
    assert few_shot(task, 4, seed=1).examples == small.examples
    assert few_shot(task, 4, seed=2).examples != small.examples


def test_truncation_cuts_the_text_field_and_keeps_the_template():
    tok = make_tokenizer(bert=True)
    specials = special_tokens(tok)
    assert specials.prefix == (2,) and specials.suffix == (3,)
    template = "Review : {text} Sentiment :"
    ids = encode_example(tok, template, {"text": "good film " * 20}, max_length=10)
    words = [tok.id_to_token(i) for i in ids]
    assert len(ids) == 10
    assert words[:3] == ["[CLS]", "Review", ":"] and words[-3:] == ["Sentiment", ":", "[SEP]"]
    full = encode_example(tok, template, {"text": "good film"}, max_length=64)
    assert [tok.id_to_token(i) for i in full] == ["[CLS]", "Review", ":", "good", "film", "Sentiment", ":", "[SEP]"]
    with pytest.raises(TextError, match="raise max_length"):
        encode_example(tok, template, {"text": "good"}, max_length=4)
    with pytest.raises(TextError, match="needs field 'text'"):
        encode_example(tok, template, {"body": "good"}, max_length=10)
