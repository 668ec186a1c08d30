"""The evaluation harness: tasks that cannot be passed by luck, scorers, methods on equal terms, resumable
cells, and reports with honest intervals."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from hcmemory import cache_kwarg
from hcmemory.eval import report as report_module  # the module (hcmemory.eval exports write_report)
from hcmemory.eval import methods as methods_module
from hcmemory.eval.methods import PressMethod, cache_bytes, parse_method, record, tensor_bytes
from hcmemory.eval.runner import Plan, run
from hcmemory.eval import tasks as tasks_module
from hcmemory.eval.fillers import REAL_FILLERS, real_paragraphs
from hcmemory.eval.tasks import TASKS, Question, make_case, normalize, score

from .conftest import tiny_model


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [1024, 3000])
def test_cases_are_deterministic_and_sized(tokenizer, task, length):
    a, b = make_case(task, length, 3, tokenizer), make_case(task, length, 3, tokenizer)
    assert a == b, "the same seed gives the same case"
    assert make_case(task, length, 4, tokenizer).context != a.context
    tokens = len(tokenizer(a.context, add_special_tokens=False).input_ids)
    assert 0.9 * length <= tokens <= 1.1 * length
    assert a.questions and all(q.answers for q in a.questions)


@pytest.mark.parametrize("task", [t for t in TASKS if t != "cwe"])
def test_every_answer_occurs_exactly_once(tokenizer, task):
    for seed in range(6):  # every filler kind, logs (digits everywhere) included
        case = make_case(task, 2048, seed, tokenizer)
        for q in case.questions:
            for answer in q.answers:
                if task == "vt":  # variables are named twice (assigned, then read); each assignment once
                    assert case.context.count(f"VAR {answer} =") == 1
                else:
                    assert case.context.count(answer) == 1, (case.key, answer)


def test_cwe_answers_are_the_most_frequent_words(tokenizer):
    case = make_case("cwe", 2048, 0, tokenizer)
    words = [line.split(". ", 1)[1] for line in case.context.splitlines()[1:]]
    counts = sorted(((words.count(w), w) for w in set(words)), reverse=True)
    assert {w for _, w in counts[:5]} == set(case.questions[0].answers)
    assert counts[4][0] > 2 * counts[5][0]
    assert case.questions[1].answers == (counts[0][1],) and counts[0][0] > counts[1][0], "one most common word"


def test_questions_are_phrased_differently_from_their_needles(tokenizer):
    cases = [make_case("single", 1024, seed, tokenizer) for seed in range(12)]
    assert len({c.questions[0].text.split(" the ")[0] for c in cases}) >= 3, "several question phrasings"
    assert len({c.filler for c in cases}) == 4
    kinds = {("-" in c.questions[0].answers[0], c.questions[0].answers[0].isdigit()) for c in cases}
    assert len(kinds) == 3, "numbers, words and codes"


@pytest.mark.parametrize("task", [t for t in TASKS if t != "cwe"])
def test_real_prose_haystacks_keep_their_needles_and_every_answer_once(tokenizer, task):
    for seed in range(len(REAL_FILLERS)):
        case = make_case(task, 2048, seed, tokenizer, REAL_FILLERS)
        plain = make_case(task, 2048, seed, tokenizer)
        assert case.filler == REAL_FILLERS[seed] and case.context != plain.context
        if task != "single":  # the same needles and questions (single's word values avoid the text's words)
            assert [q.text for q in case.questions] == [q.text for q in plain.questions]
        for q in case.questions:
            for answer in q.answers:
                needle = f"VAR {answer} =" if task == "vt" else answer
                assert case.context.count(needle) == 1, (case.key, case.filler, answer)


@pytest.mark.parametrize("kind", REAL_FILLERS)
def test_a_real_filler_is_its_document_read_in_order_from_a_seeded_paragraph(tokenizer, kind):
    paragraphs = real_paragraphs(kind)
    assert len(paragraphs) > 150 and all("\n" not in p for p in paragraphs), "one paragraph a block, lines joined"
    starts = set()
    for seed in range(4):
        case = make_case("multikey", 3000, seed * len(REAL_FILLERS) + REAL_FILLERS.index(kind), tokenizer,
                         REAL_FILLERS)
        blocks = [b for b in case.context.split("\n\n") if b in paragraphs]
        assert len(blocks) >= len(case.context.split("\n\n")) - 5, "only the five needles are not the text's"
        first = [i for i in range(len(paragraphs))  # a heading may recur: the start is where the rest follows
                 if blocks == [paragraphs[(i + j) % len(paragraphs)] for j in range(len(blocks))]]
        assert first, "the document's paragraphs in order"
        starts.add(first[0])
    assert len(starts) == 4, "each seed starts elsewhere in the document"


def test_word_needles_are_never_words_of_a_real_filler():
    for kind in REAL_FILLERS:
        text = set(re.findall(r"[a-z]+", " ".join(real_paragraphs(kind)).lower()))
        values = {tasks_module._value(random.Random(i), "word", kind) for i in range(200)}
        assert values and not values & text, kind


def test_the_generated_fillers_haystacks_are_the_committed_grids(tokenizer):
    """Real fillers are an option: the default cases stay those of the committed grid, whose cells are
    keyed by each case's digest (a changed haystack would recompute the whole grid)."""
    from hcmemory.eval.runner import _digest

    cells = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "eval" / "cells" / "full"
    for name in ("qa-2048-0.json", "multikey-2048-1.json", "vt-2048-2.json", "single-2048-3.json"):  # each filler
        cell = json.loads((cells / name).read_text(encoding="utf-8"))
        assert cell["case"] == _digest(make_case(cell["task"], cell["length"], cell["seed"], tokenizer)), name


def test_unknown_fillers_are_refused(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="filler"):
        make_case("single", 512, 0, tokenizer, ("novels",))
    with pytest.raises(ValueError, match="filler"):
        run(Plan(methods=["full"], tasks=["single"], lengths=[512], questions=1, out=tmp_path, fillers=()))


def test_scores_are_inclusion_after_normalisation():
    q = Question("?", ("7f3a-91c2",))
    assert score("The code is 7F3A 91C2.", q) == 1.0 and score("7f3a", q) == 0.0
    assert score("1,234,567", Question("?", ("1234567",))) == 1.0
    assert score("apple and river", Question("?", ("apple", "river", "candle", "window"))) == 0.5
    assert normalize("Tromsø!") == "tromsø"


def test_method_specs():
    hc = parse_method("hc-12.5:top_p=0.99,selection_aggregate=union")
    assert hc.config.top_p == 0.99 and hc.config.selection_aggregate == "union"
    assert parse_method("kvpress:SnapKV@0.4").bytes_ratio == 0.4
    with pytest.raises(ValueError, match="known"):
        parse_method("kvpress:Nope@0.1")
    with pytest.raises(ValueError, match="preset"):
        parse_method("hc-3")
    assert parse_method("quanto-4").name == "quanto-4"
    assert parse_method("quanto-2:q_group_size=32").group_size == 32
    with pytest.raises(ValueError, match="q_group_size=N"):
        parse_method("quanto-3")


@pytest.mark.core
def test_smaller_quanto_groups_store_more_bytes():
    """A quanto cache with smaller groups is a peer's point further along the total-bytes axis."""
    pytest.importorskip("optimum.quanto")
    model = tiny_model("llama")
    rec = record(model, torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(2)).tolist())

    def stored(spec: str) -> int:
        cache = parse_method(spec).build(model, rec)
        return sum(tensor_bytes(t) for layer in cache.layers for t in vars(layer).values())

    assert stored("quanto-4:q_group_size=8") > stored("quanto-4") > stored("quanto-2")


def test_full_method_is_a_plain_dynamic_cache_prefill():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    rec = record(model, ids[0].tolist())
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model.model(input_ids=ids, **cache_kwarg(model, cache))
    for layer, k, v in zip(cache.layers, rec.keys, rec.values):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    assert len(rec.hidden) == 2 and all(h.shape == (1, 40, 64) for h in rec.hidden)
    assert tensor_bytes(rec.keys[0]) == rec.keys[0].numel() * 4


@pytest.mark.core
@pytest.mark.parametrize("press", ["SnapKV", "StreamingLLM", "Knorm", "ExpectedAttention", "TOVA"])
def test_replayed_presses_equal_kvpress_own_compression(press):
    """Presses replayed on the recorded prefill keep exactly the rows kvpress's hooks keep."""
    kvpress = pytest.importorskip("kvpress")
    model = tiny_model("llama", num_hidden_layers=2)
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(1))
    method = PressMethod(press, 0.25)
    replayed = method.build(model, record(model, ids[0].tolist()))
    cache = DynamicCache(config=model.config)
    own = getattr(kvpress, f"{press}Press")(compression_ratio=1 - 0.25 * 2 / 4)
    with torch.no_grad(), own(model):
        model.model(input_ids=ids, **cache_kwarg(model, cache))
    for ours, theirs in zip(replayed.layers, cache.layers):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)


def test_a_recording_in_chunks_is_the_one_pass_prefill(monkeypatch):
    """Chunked (so 32K tokens do not hold 32K x 32K scores), the recording keeps what one pass computes,
    each layer's inputs and rotary tables too."""
    model = tiny_model("gemma3")
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    whole = record(model, ids)
    monkeypatch.setattr(methods_module, "RECORD_CHUNK", 16)
    chunked = record(model, ids)
    for name in ("keys", "values", "hidden"):
        for a, b in zip(getattr(whole, name), getattr(chunked, name)):
            assert a.shape == b.shape and a.shape[-2 if name != "hidden" else 1] == 70
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (cos_a, sin_a), (cos_b, sin_b) in zip(whole.position_embeddings, chunked.position_embeddings):
        torch.testing.assert_close(cos_a, cos_b) and torch.testing.assert_close(sin_a, sin_b)
    sliding, global_ = chunked.position_embeddings[0][0], chunked.position_embeddings[1][0]
    assert not torch.equal(sliding, global_)  # Gemma 3 rotates its two kinds of layers with different bases
    plain = DynamicCache()  # every row of every layer, the sliding ones masked to their window instead
    with torch.no_grad():
        model.model(input_ids=torch.tensor([ids]), **cache_kwarg(model, plain))
    for layer, keys, values in zip(plain.layers, chunked.keys, chunked.values):
        torch.testing.assert_close(keys, layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(values, layer.values, rtol=1e-4, atol=1e-5)


@pytest.mark.core
def test_presses_on_a_hybrid_model_compress_the_global_layers_and_answer_as_decoding_would():
    """On Gemma 3's layout a press keeps the sliding layers whole (as kvpress does); the question then
    runs one token at a time, since a one-pass prompt would see its own later tokens in the shorter
    global layer, and memory counts a sliding layer's window, not the rows kept for cutting back."""
    pytest.importorskip("kvpress")
    model = tiny_model("gemma3")
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(4)).tolist()
    rec = record(model, ids)
    method = PressMethod("SnapKV", 0.25)
    cache = method.build(model, rec)
    assert [cache.get_seq_length(i) for i in range(3)] == [160, 20, 160]  # fp32 model: 12.5 % of the tokens
    row_bytes = 2 * model.config.num_key_value_heads * 16 * 4  # keys + values, heads of 16, float32
    assert cache_bytes(model, cache) == (15 + 20 + 15) * row_bytes  # window 16: 15 rows per sliding layer
    question = torch.randint(0, 256, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    reference = method.build(model, rec)
    with torch.no_grad():
        for offset, token in enumerate(question):
            expected = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[160 + offset]]),
                             use_cache=True, **cache_kwarg(model, reference)).logits[0, -1]
    torch.testing.assert_close(methods_module._prompt(model, method.build(model, rec), question, 160), expected)
    expected_attention = PressMethod("ExpectedAttention", 0.25).build(model, rec)  # rotates with the layer's own base
    assert [expected_attention.get_seq_length(i) for i in range(3)] == [160, 20, 160]
    try:  # why _prompt does not take the one-pass path here: it fails, or (mask cut to length) it is wrong
        with torch.no_grad():
            wrong = model(input_ids=torch.tensor([question]), position_ids=torch.arange(160, 169)[None],
                          use_cache=True, **cache_kwarg(model, method.build(model, rec))).logits[0, -1]
        assert not torch.allclose(wrong, expected, atol=1e-4)
    except RuntimeError as exc:
        assert "must match" in str(exc)


def test_a_uniform_cache_takes_the_prompt_in_one_pass_with_the_same_logits():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(6)).tolist()
    rec = record(model, ids)
    question = [5, 9, 33, 7]
    expected_cache = parse_method("full").build(model, rec)
    with torch.no_grad():
        for offset, token in enumerate(question):
            expected = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[60 + offset]]),
                             use_cache=True, **cache_kwarg(model, expected_cache)).logits[0, -1]
    torch.testing.assert_close(methods_module._prompt(model, parse_method("full").build(model, rec), question, 60),
                               expected, rtol=1e-4, atol=1e-5)


def _cell(method, task, length, seed, scores, device=0.5, total=0.5):
    return {"method": method, "task": task, "length": length, "seed": seed, "context_tokens": length, "seconds": 1.0,
            "memory": {"device_ratio": device, "total_ratio": total, "selected_fraction": None},
            "questions": [{"question": "?", "answers": ["x"], "depth": 0.5, "answer": "", "score": s} for s in scores]}


def test_report_task_average_and_paired_interval(tmp_path):
    cells = [_cell("full", "single", 1024, 0, [1, 1, 0, 1]), _cell("full", "qa", 1024, 0, [1, 0]),
             _cell("hc", "single", 1024, 0, [1, 1, 0, 1]), _cell("hc", "qa", 1024, 0, [1, 0]),
             _cell("bad", "single", 1024, 0, [0, 0, 0, 0]), _cell("bad", "qa", 1024, 0, [0, 0])]
    rows = {(r["method"], r["length"]): r for r in report_module.summarize(cells)}
    assert rows[("full", 1024)]["accuracy"] == pytest.approx((0.75 + 0.5) / 2), "mean over tasks, not questions"
    assert rows[("hc", 1024)]["delta"] == 0 and rows[("hc", 1024)]["delta_low"] == rows[("hc", 1024)]["delta_high"] == 0
    assert rows[("bad", 1024)]["delta_high"] < 0
    low, high = rows[("full", 1024)]["ci_low"], rows[("full", 1024)]["ci_high"]
    assert low < rows[("full", 1024)]["accuracy"] < high
    for cell in cells:
        path = tmp_path / "cells" / cell["method"] / f"{cell['task']}-{cell['length']}-{cell['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    text = report_module.write_report(tmp_path).read_text()
    assert "| full | 50.0 % | 50.0 % | 62.5" in text and "Δ vs full" in text and "n=6" in text
    ablation = tmp_path / "ablation"
    for cell in cells[:2] + cells[4:]:
        path = ablation / "cells" / cell["method"] / f"{cell['task']}-{cell['length']}-{cell['seed']}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell))
    text = report_module.write_report(tmp_path, tmp_path / "out.md", [ablation]).read_text()
    section = text.split("## Ablation")[1]
    assert "| bad | -62.5" in section and "| hc |" not in section
    # a second model's page beside the first names its plots after itself, so neither overwrites the other's
    page = report_module.write_report(tmp_path, tmp_path / "docs" / "RESULTS-gemma.md")
    plots = sorted(p.name for p in page.parent.glob("*.png"))
    assert "results-gemma-accuracy-vs-length.png" in plots and all(p.startswith("results-gemma-") for p in plots)
    assert all(f"({name})" in page.read_text() for name in plots)


def test_head_to_head_pairs_ours_with_every_peer_in_accuracy_and_nll_gap():
    def cell(method, scores, forced):
        c = _cell(method, "single", 1024, 0, scores)
        for q, f in zip(c["questions"], forced):
            q.update(forced=f, answer_ids=[1, 2], forced_ids=[1, 2])
        return c

    cells = [cell("full", [1, 1, 0, 1], [-1, -1, -2, -1]), cell("compact", [1, 1, 0, 1], [-1.2, -1, -2, -1]),
             cell("kivi-4", [1, 0, 0, 0], [-3, -3, -2, -5]), cell("hc-25", [1, 1, 1, 1], [-1, -1, -1, -1])]
    rows = report_module.summarize(cells)
    lines = report_module.head_to_head(cells, rows).splitlines()[2:]
    assert len(lines) == 1, "compact against its one peer; full and other hc presets are not peers"
    # accuracy +2 of 4; NLL gaps per token: compact (0.1, 0, 0, 0), kivi-4 (1, 1, 0, 2): mean difference -0.975
    assert lines[0].startswith("| compact | kivi-4 |") and "| 4 | +50.0 [" in lines[0] and "| -0.975 [" in lines[0]


def test_nll_gaps_count_only_forced_scores_of_full_attentions_answer():
    """A cell that scored its own answer (a run without full attention's answers at hand, or a cell
    from before ``forced_ids`` was stored) has no NLL gap: its forced score is of another text."""
    reference = _cell("full", "single", 1024, 0, [1, 1])
    for q in reference["questions"]:
        q.update(forced=-1.0, answer_ids=[1, 2], forced_ids=[1, 2])
    method = _cell("kivi-4", "single", 1024, 0, [0, 0])
    method["questions"][0].update(forced=-3.0, answer_ids=[3], forced_ids=[1, 2])
    method["questions"][1].update(forced=-0.5, answer_ids=[3], forced_ids=[3])
    gaps = report_module._nll_gaps([method], [reference])
    assert list(gaps.values()) == [1.0]
    del method["questions"][0]["forced_ids"]
    assert report_module._nll_gaps([method], [reference]) == {}


def test_a_method_run_alone_is_scored_on_full_attentions_answers(tmp_path):
    run(Plan(methods=["hc-12.5"], tasks=["single"], lengths=[512], questions=1, out=tmp_path))
    full, hc = (json.loads(p.read_text()) for p in sorted((tmp_path / "cells").rglob("*.json")))
    assert full["method"] == "full" and hc["method"] == "hc-12.5", "full attention runs whatever the plan names"
    for f, q in zip(full["questions"], hc["questions"]):
        assert f["forced_ids"] == f["answer_ids"] and q["forced_ids"] == f["answer_ids"]


def test_a_run_is_cached_per_cell_and_resumes(tmp_path, monkeypatch):
    plan = Plan(methods=["full", "hc-12.5"], tasks=["single"], lengths=[512], questions=1, out=tmp_path)
    run(plan)
    cells = sorted((tmp_path / "cells").rglob("*.json"))
    assert [c.parent.name for c in cells] == ["full", "hc-12.5"]
    stamps = [c.stat().st_mtime_ns for c in cells]
    calls = []
    monkeypatch.setattr("hcmemory.eval.runner.record", lambda *a: calls.append(a))
    run(plan)  # nothing left to do: no prefill at all
    assert not calls and [c.stat().st_mtime_ns for c in cells] == stamps
    data = json.loads(cells[0].read_text())
    assert data["questions"][0]["answers"] and 0 <= data["questions"][0]["score"] <= 1
    assert data["memory"]["total_ratio"] == pytest.approx(2.0, rel=0.01), "a float32 DynamicCache holds 2x fp16"
    environment = json.loads((tmp_path / "environment.json").read_text())
    environment["frame"] = ["<bos>", "\nAnswer:"]  # cells prompted another way (another model's frame)
    (tmp_path / "environment.json").write_text(json.dumps(environment))
    with pytest.raises(ValueError, match="its own --out"):
        run(plan)


def test_a_cell_is_rerun_when_its_method_changes_definition(tmp_path, monkeypatch):
    """Cells are keyed by what the method computes with, not its name: a preset redefined between two
    runs must not report the old definition's numbers."""
    from hcmemory import config as config_module

    plan = Plan(methods=["hc-12.5"], tasks=["single"], lengths=[512], questions=1, out=tmp_path)
    run(plan)
    cell = tmp_path / "cells" / "hc-12.5" / "single-512-0.json"
    before = json.loads(cell.read_text())["identity"]
    monkeypatch.setitem(config_module.PRESETS, "hc-12.5", {**config_module.PRESETS["hc-12.5"], "top_p": 0.8})
    run(plan)
    after = json.loads(cell.read_text())["identity"]
    assert before != after and '"top_p": 0.8' in after


def test_a_cell_stored_before_a_field_was_added_is_reused_only_at_that_fields_old_value():
    from hcmemory.config import ADDED_FIELDS, HCConfig
    from hcmemory.eval.runner import _same_identity

    current = HCConfig.preset("hc-12.5").to_dict()
    stored = {k: v for k, v in current.items() if k not in ADDED_FIELDS}
    assert _same_identity(json.dumps(stored, sort_keys=True), json.dumps(current, sort_keys=True))
    for field, value in (("rescore_residual", True), ("quant_group_size", 64), ("quant_rotation", True),
                         ("full_precision_window", True)):
        changed = {**current, field: value}
        assert not _same_identity(json.dumps(stored, sort_keys=True), json.dumps(changed, sort_keys=True))
    assert not _same_identity("kvpress:SnapKV@0.125", json.dumps(current)) and _same_identity("full", "full")


def test_cases_run_round_robin_over_tasks_and_lengths():
    from hcmemory.eval.runner import _interleaved

    groups = [["s0", "s1", "s2"], ["m0"], ["q0", "q1"]]
    assert _interleaved(groups) == ["s0", "m0", "q0", "s1", "q1", "s2"]


def test_plots_name_presets_and_peers_and_leave_ablations_unnamed():
    named = ["full", "compact", "hc-12.5-bounded", "streaming:budget=0.0625", "quanto-4:q_group_size=32",
             "kvpress:SnapKV@0.4", "quanto-2"]
    variants = ["compact:top_p=0.95", "kivi-4:full_precision_window=false", "h2o:budget=0.1,eviction=mean"]
    assert not any(map(report_module.is_variant, named))
    assert all(map(report_module.is_variant, variants))
