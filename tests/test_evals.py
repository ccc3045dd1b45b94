"""The offline long-context suite, the sweep's intervals and configuration specs, and the sweep itself
(smoke version, SmolLM2)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "evals" / "tasks"))
sys.path.insert(0, str(ROOT / "evals"))

import minikv_data  # noqa: E402
import minikv_metrics  # noqa: E402
import stats  # noqa: E402
import sweep  # noqa: E402

GENERATORS = [
    minikv_data.niah_single,
    minikv_data.niah_multikey,
    minikv_data.niah_multivalue,
    minikv_data.niah_multiquery,
    minikv_data.passkey,
    minikv_data.variable_tracking,
    minikv_data.common_words,
    minikv_data.frequent_words,
]


@pytest.mark.parametrize("gen", GENERATORS, ids=lambda g: g.__name__)
def test_generated_tasks_are_seeded_sized_and_hold_their_answers(gen):
    a, b, c = (gen(tokens=800, samples=3, seed=s)["test"] for s in (0, 0, 1))
    assert a.to_list() == b.to_list() and a.to_list() != c.to_list()  # the seed decides everything
    for row in a:
        assert 0.4 * 800 * minikv_data.CHARS_PER_TOKEN < len(row["input"]) < 1.6 * 800 * minikv_data.CHARS_PER_TOKEN
        text = row["input"]
        if gen is minikv_data.common_words:  # the common words are the most frequent in the list
            counts = {w: text.count(f". {w} ") for w in minikv_data.WORDS}
            others = [counts[w] for w in counts if w not in row["outputs"]]
            assert min(counts[w] for w in row["outputs"]) > max(others)
        elif gen is not minikv_data.frequent_words:
            assert all(o in text for o in row["outputs"])  # the needles are in the haystack
        assert minikv_metrics.string_match_all(row, [" ".join(row["outputs"])])["score"] == 1.0
        assert minikv_metrics.string_match_all(row, ["nothing"])["score"] == 0.0


def test_multiple_choice_and_perplexity_data():
    mc = minikv_data.passkey_choice(tokens=500, samples=4)["test"]
    assert all(len(set(r["choices"])) == 4 and r["choices"][r["label"]] in r["input"] for r in mc)
    docs = minikv_data.reference_text(tokens=1000, samples=3)["test"]
    assert len({d["name"] for d in docs}) == 3 and all(len(d["text"]) == 4000 for d in docs)


@pytest.mark.parametrize(
    "p, n, expected",
    [
        (0.5, 10, (0.2366, 0.7634)),  # center stays at 1/2: 1/2 -+ z sqrt(1/40 + z^2/400) / (1 + z^2/10)
        (0.0, 10, (0.0, 0.2775)),  # z^2/10 / (1 + z^2/10)
        (1.0, 10, (0.7225, 1.0)),
        (0.0, 1, (0.0, 0.7935)),  # z^2 / (1 + z^2)
        (0.25, 36, (0.1375, 0.4107)),
    ],
)
def test_wilson_interval_hand_checked(p, n, expected):
    assert stats.wilson(p, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_interval_refuses_no_samples_and_scores_outside_0_1():
    for p, n in [(0.5, 0), (1.5, 10), (-0.1, 10)]:
        with pytest.raises(ValueError):
            stats.wilson(p, n)


def test_intervals_of_a_row_pool_samples_over_tasks():
    row = dict(mean_score=0.5, minikv_a=1.0, minikv_b=0.0)
    out = sweep.with_intervals(row, ["minikv_a", "minikv_b"], samples=5)
    assert (out["ci_low"], out["ci_high"]) == pytest.approx(stats.wilson(0.5, 10), abs=1e-4)
    assert (out["ci_low_minikv_a"], out["ci_high_minikv_a"]) == pytest.approx(stats.wilson(1.0, 5), abs=1e-4)


def test_config_specs_groups_files_and_unknown_names(tmp_path):
    assert sweep.load_configs("baselines,policies") == sweep.GROUPS["baselines"] + sweep.GROUPS["policies"]
    fidelity = dict(sweep.load_configs("fidelity"))
    assert fidelity["minikv defaults"] == dict(cache="minikv", preset="snapkv")  # the defaults it was measured with
    assert fidelity["MiniKV paper recipe"] == dict(cache="minikv", preset="paper")
    path = tmp_path / "mine.py"
    path.write_text("GROUPS = {'a': [('x', dict(cache='full'))], 'b': [('y', dict(bits=4))]}\n")
    assert sweep.load_configs(str(path)) == [("x", dict(cache="full")), ("y", dict(bits=4))]
    assert sweep.load_configs(f"{path}:b") == [("y", dict(bits=4))]
    for spec in ("nope", f"{path}:baselines"):
        with pytest.raises(SystemExit, match="unknown config groups"):
            sweep.load_configs(spec)


def test_resume_reads_back_the_rows_it_wrote_with_the_same_meta_only(tmp_path):
    meta = dict(model="m", prompt_tokens=300, samples=2, machine="x", torch="t", transformers="tf", lm_eval="l")
    rows = [
        dict(
            method="full cache",
            args='{"cache": "full"}',
            kv_percent_of_fp16=100.0,
            mean_score=0.5,
            word_perplexity=None,
            minikv_a=1.0,
            minikv_b=0.0,
            seconds=3.5,
        )
    ]
    sweep.write_outputs(rows, tmp_path / "s", meta)
    assert sweep.done_rows(tmp_path / "s.csv", meta) == rows
    assert sweep.done_rows(tmp_path / "s.csv", dict(meta, samples=10)) == []
    assert sweep.done_rows(tmp_path / "missing.csv", meta) == []


def test_knobs_minikv_hf_would_drop_are_refused():
    sweep.check_knobs(sweep.GROUPS["baselines"] + sweep.GROUPS["minikv"] + sweep.GROUPS["policies"])
    with pytest.raises(SystemExit, match="budgett"):
        sweep.check_knobs([("typo", dict(cache="minikv", budgett=0.5))])


@pytest.mark.slow
def test_smoke_sweep_writes_csv_markdown_and_plot(tmp_path):
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evals" / "sweep.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["method"] for r in rows] == ["full cache", "minikv 2-bit, minikv scorer"]
    full, mkv = rows
    assert float(full["kv_percent_of_fp16"]) == 100.0 and 5 < float(mkv["kv_percent_of_fp16"]) < 40
    for r in rows:  # generate_until, multiple choice (log-likelihood) and rolling perplexity all ran
        assert 0 <= float(r["minikv_passkey"]) <= 1 and 0 <= float(r["minikv_passkey_choice"]) <= 1
        assert float(r["word_perplexity"]) > 1
        assert float(r["ci_low"]) <= float(r["mean_score"]) <= float(r["ci_high"])  # n = 1 sample x 2 tasks
        assert float(r["ci_low_minikv_passkey"]) <= float(r["minikv_passkey"]) <= float(r["ci_high_minikv_passkey"])
    assert float(mkv["word_perplexity"]) != float(full["word_perplexity"])  # compression reached the scores
    table = out.with_suffix(".md").read_text()
    assert "| full cache |" in table and f"| {float(full['mean_score']):.3f} [{float(full['ci_low']):.3f}, " in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_shared_context_samples_hold_their_answers_and_score_the_answer_tokens(tmp_path):
    """``evals/shared_context.py``: five different questions per document, each answer in the document,
    the scored tokens of a turn are its answer, every configuration runs, rows go to CSV and markdown."""
    import shared_context
    from models import smollm2

    import minikv

    model, tok = smollm2()
    samples = [shared_context.make_sample(tok, 500, 0, i) for i in range(2)]
    assert samples[0] == shared_context.make_sample(tok, 500, 0, 0)  # seeded
    dialogue = shared_context.Dialogue(tok)
    for i, (doc, turns) in enumerate(samples):
        assert sorted(t[0] for t in turns) == sorted(shared_context.TASKS) and turns[0][0] == shared_context.TASKS[i]
        for task, question, prefix, answer in turns:
            if task == "quote":  # the sentence's words (the quote is built from them, single-spaced)
                assert " ".join((prefix[1:] + answer).split()) in " ".join(doc.split())
            else:
                assert answer in doc  # the needle
            ids, n = dialogue.turn(question, prefix, answer)
            assert tok.decode(ids[-n:]).strip() == answer.strip()
    doc, turns = samples[0]
    full, ratio, _ = shared_context.run_sample(model, dialogue, None, doc, turns)
    assert ratio == (1.0, 1.0) and all(0.0 <= s <= 1.0 and nll >= 0.0 for _, s, nll in full)
    minikv.patch(model, preset="kvzip")
    try:
        squeezed, (doc_ratio, end_ratio), _ = shared_context.run_sample(model, dialogue, {}, doc, turns)
    finally:
        minikv.unpatch(model)
    assert [r[0] for r in squeezed] == [r[0] for r in full] and 0 < doc_ratio < 0.3 and 0 < end_ratio < 0.3
    out = tmp_path / "rows.csv"
    shared_context.append_row(out, dict(config="a", mean=0.5))
    shared_context.append_row(out, dict(config="b", mean=0.25, kv_percent_of_fp16=12.9))
    assert [r["config"] for r in csv.DictReader(open(out))] == ["a", "b"] and "| b | 12.9 |" in out.with_suffix(
        ".md"
    ).read_text()


def test_paired_comparison_takes_differences_per_sample(tmp_path):
    """``evals/paired.py``: configurations matched by (seed, sample); differences hand-checked."""
    import json

    import paired

    lines = [
        dict(config="full", seed=0, sample=0, turns=[["key1", 1.0, 0.5], ["quote", 0.5, 1.5]]),
        dict(config="full", seed=0, sample=1, turns=[["key1", 0.0, 2.0], ["quote", 1.0, 0.0]]),
        dict(config="small", seed=0, sample=0, turns=[["key1", 0.0, 1.5], ["quote", 0.5, 1.5]]),
        dict(config="small", seed=0, sample=1, turns=[["key1", 0.0, 3.0], ["quote", 1.0, 1.0]]),
        dict(config="small", seed=0, sample=2, turns=[["key1", 1.0, 0.0], ["quote", 1.0, 0.0]]),  # no pair: left out
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = {r["config"]: r for r in paired.compare(paired.load(str(path)), "full")}
    small = rows["small"]
    assert small["samples"] == 2 and small["score"] == 0.375 and small["turns_vs_base"] == [0.0, 1.0]
    assert small["turns"] == [0.0, 0.75] and small["tasks"] == {"key1": 0.0, "quote": 0.75}
    assert small["nll"] == 1.75 and small["d_nll"].startswith("+0.7500 +- 0.4900")  # per sample +0.5, +1.0
    assert small["d_score"].startswith("-0.250 +- 0.490")  # -0.5, 0.0
    assert rows["full"]["d_nll"].startswith("+0.0000")
    with pytest.raises(SystemExit, match="--base"):
        paired.compare(paired.load(str(path)), "nothing")


def test_frontier_compares_on_the_shared_samples_and_flags_the_undominated(tmp_path):
    """``evals/frontier.py``: every row on the samples all configurations ran; hand-checked ratios."""
    import json

    import frontier

    def rec(config, sample, a, b):
        return dict(config=config, seed=0, sample=sample, turns=[["key1", a, 0.0], ["quote", b, 0.0]])

    lines = [rec("full cache", 0, 1.0, 1.0), rec("full cache", 1, 1.0, 0.0), rec("full cache", 2, 0.0, 1.0)]
    lines += [rec("cheap", 0, 1.0, 0.0), rec("cheap", 1, 0.0, 0.0), rec("cheap", 2, 1.0, 1.0)]
    lines += [rec("dear", 0, 1.0, 1.0), rec("dear", 1, 1.0, 0.0)]  # two samples: the shared set is 0, 1
    lines += [rec("worse", 0, 0.0, 0.0), rec("worse", 1, 0.0, 0.0)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "t.csv").write_text(
        "config,kv_percent_of_fp16,kv_percent_after_turns\ncheap,10,12\ndear,20,22\nworse,15,16\nworse,14,17\n"
    )
    rows = {r["config"]: r for r in frontier.rows(tmp_path / "r.jsonl", tmp_path / "t.csv")}
    assert rows["cheap"]["samples"] == 2 and rows["cheap"]["of_full"] == pytest.approx(1 / 3)  # 1/4 of 3/4
    assert rows["cheap"]["turns"] == [0.5, 0.0] and rows["cheap"]["weakest_turn"] == 0.0
    assert rows["cheap"]["more"] == (3, pytest.approx(0.75))  # over samples 0-2: 3/6 against 4/6
    assert rows["dear"]["of_full"] == 1.0 and rows["dear"]["more"] is None
    assert (rows["worse"]["kv_doc"], rows["worse"]["kv_after"]) == (15.0, 17.0)  # the largest of its rows
    assert [rows[c]["frontier"] for c in ("cheap", "dear", "worse")] == [True, True, False]
