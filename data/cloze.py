"""A zero-shot cloze task cut from real text, in lm-eval's own task format, for offline evaluation.

Each item is a passage that ends one word short (LAMBADA-style): the choices are the real last
word and distractor words drawn from the same article, so the task needs the context, not word
frequency. The output is a directory lm-eval reads through `include_path`: `<name>.yaml`
(multiple_choice, acc and acc_norm) and `<name>.jsonl` (context, choices, answer).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import yaml

from data.artifacts import atomic_directory

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
WORD = re.compile(r"^[A-Za-z]{4,}$")


def cloze_items(articles: list[str], count: int, choices: int, seed: int, context_words: int = 48) -> list[dict]:
    """Up to `count` items, spread over the articles in a seeded order."""
    rng = random.Random(seed)
    candidates = []
    for article in articles:
        words = [w.strip(".,;:!?\"'()") for w in article.split()]
        vocabulary = sorted({w for w in words if WORD.match(w)})
        sentences = SENTENCE_END.split(article)
        history: list[str] = []
        for sentence in sentences:
            tokens = sentence.split()
            last = tokens[-1].rstrip(".!?\"')") if tokens else ""
            if len(tokens) >= 12 and WORD.match(last) and len(vocabulary) > choices:
                context = " ".join((history + tokens[:-1])[-context_words:])
                candidates.append((context, last, vocabulary))
            history = (history + tokens)[-context_words:]
    rng.shuffle(candidates)
    items = []
    for context, answer, vocabulary in candidates[:count]:
        distractors = rng.sample([w for w in vocabulary if w.lower() != answer.lower()], choices - 1)
        options = [answer, *distractors]
        rng.shuffle(options)
        items.append({"context": context, "choices": options, "answer": options.index(answer)})
    return items


def write_cloze_task(articles: list[str], output: Path, name: str, count: int = 200, choices: int = 4,
                     seed: int = 1234) -> Path:
    """Write the task directory atomically; returns it (pass it as lm-eval's include_path)."""
    items = cloze_items(articles, count, choices, seed)
    if not items:
        raise ValueError("no cloze items could be cut from the text: it needs sentences of 12+ words")
    with atomic_directory(output, overwrite=True) as tmp:
        with open(tmp / f"{name}.jsonl", "w") as handle:
            for item in items:
                handle.write(json.dumps(item) + "\n")
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(Path(output).resolve() / f"{name}.jsonl")}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": "{{context}}",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}",
            "target_delimiter": " ",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0, "source": "cut by data/cloze.py", "items": len(items),
                         "choices": choices, "seed": seed},
        }
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return output
