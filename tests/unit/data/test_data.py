import json
import logging

import pytest

from miles_ray.config import DataConfig
from miles_ray.data import DataError, PromptSampler, load_prompts, synthetic_rows, validate_rows


def test_jsonl_bad_rows_skipped_with_row_numbers(tmp_path, tokenizer, caplog):
    rows = [
        {"prompt": "What is 1+1?", "label": "2"},
        {"prompt": "no label"},
        {"label": 3},
        {"prompt": 5, "label": "5"},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "label": 4},
        {"prompt": "x " * 400, "label": "1"},
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    with caplog.at_level(logging.WARNING):
        items, report = load_prompts(DataConfig(source=str(p), max_prompt_tokens=64), tokenizer)
    assert [i.index for i in items] == [0, 4]
    assert items[1].label == "4" and "<|im_start|>user\nWhat is 2+2?" in items[1].prompt
    assert items[0].prompt.endswith("<|im_start|>assistant\n")
    assert report.n_skipped == 5 and report.total == 7
    assert report.skipped["missing 'label'"] == [1]
    assert report.skipped["missing 'prompt'"] == [2]
    assert report.skipped["invalid JSON"] == [6]
    assert "skipped 5 of 7 rows" in caplog.text and "rows 5" in caplog.text


def test_parquet_with_custom_keys(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"question": ["What is 3+4?", None], "answer": ["7", "1"]}), p)
    cfg = DataConfig(source=str(p), prompt_key="question", label_key="answer", apply_chat_template=False)
    items, report = load_prompts(cfg, tokenizer)
    assert [(i.prompt, i.label) for i in items] == [("What is 3+4?", "7")]
    assert report.skipped == {"missing 'question'": [1]}


def test_no_usable_rows_fails_clearly(tmp_path, tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"q": "a"}) + "\n")
    with pytest.raises(DataError, match="no usable rows out of 1.*data.prompt_key"):
        load_prompts(DataConfig(source=str(p)), tokenizer)
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(DataConfig(source=str(tmp_path / "missing.jsonl")), tokenizer)
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "d.csv").write_text("a,b\n")
        load_prompts(DataConfig(source=str(tmp_path / "d.csv")), tokenizer)


def test_synthetic_arithmetic_labels_are_correct():
    rows = synthetic_rows("arithmetic", 50, 9, seed=3)
    for r in rows:
        a, b = r["prompt"][len("What is "):-1].split("+")
        assert int(a) + int(b) == int(r["label"]) and 0 <= int(a) <= 9


def test_sampler_epochs_and_resume(tokenizer):
    items, _ = validate_rows(synthetic_rows("arithmetic", 5, 9, 0), tokenizer)
    s = PromptSampler(items, seed=1)
    first = [i.index for i in s.next_batch(5)]
    assert sorted(first) == list(range(5))  # one epoch covers every row once
    s.next_batch(2)
    state = s.state_dict()
    expected = [i.index for i in s.next_batch(4)]
    t = PromptSampler(items, seed=1)
    t.load_state_dict(state)
    assert [i.index for i in t.next_batch(4)] == expected
