"""benchmarks/results.py: the rows it runs (overrides, checked by loading them as real recipes), the aggregation
and the markdown it writes, the skip of finished rows, and the peak-memory measurement. Nothing here trains."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import results  # noqa: E402
import results_render as render  # noqa: E402
import results_rows as rows  # noqa: E402
from cpcx.data.classes import VOC_CLASSES  # noqa: E402
from cpcx.recipe_io import parse_overrides  # noqa: E402

SETTINGS = rows.Settings(work_dir="runs-bench-test", seeds=(0, 1, 2), segment_seeds=(0,))


# ---------------------------------------------------------------------------------------- aggregation
def test_mean_std_is_the_sample_std_of_the_values_present():
    mean, std, n = render.mean_std([0.2, None, 0.4, float("nan")])
    assert n == 2 and mean == pytest.approx(0.3) and std == pytest.approx(0.1414213, rel=1e-5)
    assert render.mean_std([0.25]) == (0.25, None, 1)
    assert render.mean_std([None]) == (None, None, 0)
    assert render.fmt_pm([0.2, 0.3, 0.4]) == "30.0 ± 10.0"
    assert render.fmt_pm([0.279]) == "27.9"
    assert render.fmt_pm([]) == "—"


def test_compact_partition_names_groups_and_counts_singletons():
    static = [{"name": "vehicle", "members": ["aeroplane", "bus"]}, {"name": "person", "members": ["person"]}]
    assert render.compact_partition(static) == "vehicle {aeroplane, bus} + singletons: person"
    alone = [{"name": c, "members": [c]} for c in VOC_CLASSES]
    assert render.compact_partition(alone) == "20 singletons (every class alone)"
    odd = [{"name": "a|b", "members": ["cat", "dog"]}]
    assert "|" not in render.compact_partition(odd).replace("\\|", "")


# ------------------------------------------------------------------------------------------- rows
def _by_row(experiments):
    return {e.row: e for e in experiments if e.seed == 0}


def test_table4_rows_hold_the_ablation_overrides():
    table = rows.table4(SETTINGS)
    assert len(table) == 10 * 3 and {e.seed for e in table} == {0, 1, 2}
    a, b, c, d, e, f, g, h, i, j = (_by_row(table)[r] for r in "abcdefghij")
    # (a)-(f) decode without voc-mini's class probe, (g) is (f) with it, in a run folder of its own
    assert all(rows.NO_PROBE in x.overrides for x in (a, b, c, d, e, f)) and rows.NO_PROBE not in g.overrides
    assert g.overrides == () and g.run_name != f.run_name
    assert set(a.overrides) == {"model.cluster_token=false", "loss.pce_weight=0", rows.NO_PROBE} and not a.needs_llm
    assert {"clustering.queries=1", "clustering.refine=false", "loss.pce_weight=0"} <= set(b.overrides)
    assert {"clustering.queries=10", "clustering.refine=true", "loss.pce_weight=0"} <= set(c.overrides)
    assert "loss.pce_weight=0" not in d.overrides and "clustering.queries=10" in d.overrides
    assert b.llm == c.llm == d.llm == "gemma"
    # (h)-(j): (b)-(d) again with the instruction-tuned model, each in a run folder of its own
    for gemma_row, qwen_row in ((b, h), (c, i), (d, j)):
        assert qwen_row.llm == "qwen" and qwen_row.run_name != gemma_row.run_name
        assert qwen_row.overrides[1:] == gemma_row.overrides[1:] and '"qwen2.5-coder' in qwen_row.overrides[0]
    # (e), (f): the recipe's static clusters, without then with PCE; (f) is the static source's run folder
    assert e.overrides == ("loss.pce_weight=0", rows.NO_PROBE) and f.overrides == (rows.NO_PROBE,)
    assert not (e.needs_llm or f.needs_llm or g.needs_llm)
    assert f.run_name == _by_row(rows.sources(SETTINGS, VOC_CLASSES))["static"].run_name
    # DeepLab only for the segment seeds; one token cache for every VOC row
    assert [e.segment for e in table if e.row == "a"] == [True, False, False]
    caches = {o for e in table for o in e.all_overrides(SETTINGS) if o.startswith("train.feature_cache_dir=")}
    assert caches == {"train.feature_cache_dir=runs-bench-test/features-voc"}


def test_rows_d_and_j_share_their_run_folders_with_the_gemma_and_qwen_sources():
    table, sources = _by_row(rows.table4(SETTINGS)), _by_row(rows.sources(SETTINGS, VOC_CLASSES))
    for row, source in (("d", "gemma"), ("j", "qwen")):
        assert table[row].run_name == sources[source].run_name and table[row].key != sources[source].key
        assert table[row].all_overrides(SETTINGS) == sources[source].all_overrides(SETTINGS)


def test_llm_overrides_parse_back_to_the_section():
    (_, value), = parse_overrides([rows.gemma_llm(SETTINGS, rows.VOC_RECIPE, "llm-cache", seed=2)])
    assert value["provider"] == "openai" and value["base_url"] == "http://127.0.0.1:8766/v1" and value["seed"] == 2
    assert value["cache_dir"] == "../runs-bench-test/llm-cache"  # relative to recipes/, as recipes resolve it
    (_, qwen), = parse_overrides([rows.local_llm(SETTINGS, "qwen", rows.VOC_RECIPE, "llm-cache")])
    assert qwen["model"] == "qwen2.5-coder-0.5b-instruct" and qwen["base_url"] == "http://127.0.0.1:8767/v1"
    clusters = [("it's: {odd}, \"name\"", ["cat", "dog"]), ("person", ["person"])]
    (_, value), = parse_overrides([rows.static_llm(clusters)])
    assert value == {"provider": "static", "clusters": {"it's: {odd}, \"name\"": ["cat", "dog"], "person": ["person"]}}


def test_table5_repeats_are_independent_and_cold():
    runs = rows.table5_runs(SETTINGS)
    assert len(runs) == 2 * 3 * 3 and {r.queries for r in runs} == {2, 6, 10}
    assert {r.llm for r in runs} == {"gemma", "qwen"}
    assert len({r.key for r in runs}) == len({r.name for r in runs}) == len(runs)
    llms = [parse_overrides([o for o in r.overrides if o.startswith("llm=")])[0][1] for r in runs if r.queries == 6]
    assert [v["seed"] for v in llms] == [0, 1, 2] * 2 and {v["model"] for v in llms} == set(
        m.alias for m in rows.LOCAL_LLMS.values())
    assert all(v["cache_mode"] == "refresh" and v["temperature"] > 0 for v in llms)
    # equal partitions (other names, other order) train once
    one = rows.table5_training(SETTINGS, 2, [("x", ["cat", "dog"]), ("y", ["person"])])
    two = rows.table5_training(SETTINGS, 6, [("people", ["person"]), ("pets", ["dog", "cat"])])
    assert one.run_id == two.run_id and one.row != two.row
    assert rows.table5_training(SETTINGS, 2, [("x", ["cat", "dog"])], "qwen").row == "qwen/R=2"
    pairs = rows.table5_runs(replace(SETTINGS, t5_llms=("qwen",), t5_vote="pairs"))
    assert all("clustering.vote=pairs" in r.overrides and r.key.startswith("table5/qwen-pairs/") for r in pairs)
    assert not {r.name for r in pairs} & {r.name for r in runs}  # their own run folders
    assert rows.table5_training(SETTINGS, 2, [("x", ["cat"])], "qwen", "pairs").row == "qwen-pairs/R=2"


def test_rows_are_valid_recipes_with_the_intended_settings(voc_root, monkeypatch):
    from cpcx.recipe import load_recipe
    from cpcx.runs import fingerprint

    monkeypatch.setenv("CPCX_DATA", str(voc_root.parent.parent))
    experiments = {e.key: e for e in rows.table4(SETTINGS) + rows.sources(SETTINGS, VOC_CLASSES) if e.seed == 0}
    loaded = {k: load_recipe(rows.ROOT / e.recipe, e.all_overrides(SETTINGS)) for k, e in experiments.items()}
    a, b, c, d = (loaded[f"table4/{r}/s0"] for r in "abcd")
    assert not a.model.cluster_token and a.loss.pce_weight == 0
    assert b.llm.provider == "openai" and (b.clustering.queries, b.clustering.refine) == (1, False)
    assert (c.clustering.queries, c.clustering.refine, c.loss.pce_weight) == (10, True, 0)
    own = load_recipe(rows.ROOT / rows.VOC_RECIPE, check_inputs=False)  # row (d) keeps its own λ_PCE (no ISNet here)
    assert d.loss.pce_weight == own.loss.pce_weight > 0 and str(d.llm.cache_dir).endswith("runs-bench-test/llm-cache")
    assert f"λ = {own.loss.pce_weight}" in experiments["table4/d/s0"].label
    singles = loaded["sources/one-per-class/s0"].llm
    assert singles.provider == "static" and len(singles.clusters) == 20
    assert all(members == [name] for name, members in singles.clusters.items())
    static = loaded["sources/static/s0"].llm
    assert static.provider == "static" and static.clusters == own.llm.clusters and len(static.clusters) < 20
    assert fingerprint(d, "pseudo") == fingerprint(loaded["sources/gemma/s0"], "pseudo")
    # the seed changes training, not the clusters
    d1 = next(e for e in rows.table4(SETTINGS) if e.row == "d" and e.seed == 1)
    seed1 = load_recipe(rows.ROOT / d1.recipe, d1.all_overrides(SETTINGS))
    assert fingerprint(seed1, "clusters") == fingerprint(d, "clusters")
    assert fingerprint(seed1, "train") != fingerprint(d, "train")


def test_coco_recipe_clusters_every_class_by_supercategory(coco_root, monkeypatch):
    from cpcx.clusters import class_names, static_partition
    from cpcx.recipe import load_recipe

    monkeypatch.setenv("CPCX_DATA", str(coco_root.parent))
    recipe = load_recipe(rows.ROOT / rows.COCO_RECIPE, check_inputs=False)  # its ISNet: not built by make test
    partition = static_partition(recipe.llm, class_names(recipe))  # each of the 80 classes exactly once
    assert len(partition) == 12 and sum(len(m) for _, m in partition.clusters) == 80


# ---------------------------------------------------------------------------------------- rendering
def _entry(section, row, seed, status="done", **values):
    base = {"section": section, "row": row, "label": f"label {row}", "seed": seed, "run": f"{row}-s{seed}",
            "dataset": "voc", "provider": "static", "overrides": [], "command": f"cpcx run -r r.yaml name={row}",
            "status": status, "stages": {}}
    return {**base, **values}


def fixture_doc() -> dict:
    experiments = {}
    for seed, value in enumerate([0.2, 0.3, 0.4]):
        experiments[f"table4/a/s{seed}"] = _entry(
            "table4", "a", seed, pseudo_miou=value, pseudo_miou_no_crf=value + 0.01,
            val_miou=0.1 if seed == 0 else None, counts={"train_images": 311, "val_images": 172, "train_epochs": 12},
            overrides=["model.cluster_token=false"],
            stages={"train": {"action": "run", "seconds": 100.0 + seed, "cpu_seconds": 150.0, "max_rss_mib": 900.0}})
    experiments["table4/b/s0"] = _entry("table4", "b", 0, status="not run (no local LLM)")
    experiments["sources/static/s0"] = _entry("sources", "static", 0, pseudo_miou=0.28,
                                              clusters=[{"name": "vehicle", "members": ["bus", "car"]}])
    experiments["table5/R=10/s0"] = _entry("table5", "R=10", 0, pseudo_miou=0.25)
    alone = [{"name": "cat", "members": ["cat"]}, {"name": "dog", "members": ["dog"]}]
    pair = [{"name": "pets", "members": ["cat", "dog"]}]
    runs = {f"table5/R=10/rep{k}": {"section": "table5", "queries": 10, "repeat": k, "temperature": 0.7,
                                    "command": "cpcx clusters", "status": "done", "seconds": 60.0 + k,
                                    "clusters": c, "vote_distinct": 1, "refine_iterations": 2, "converged": True}
            for k, c in enumerate([alone, pair, alone])}
    runs["table5/qwen/R=2/rep0"] = {**runs["table5/R=10/rep1"], "llm": "qwen", "queries": 2, "repeat": 0}
    experiments["table5/qwen/R=2/s0"] = _entry("table5", "qwen/R=2", 0, pseudo_miou=0.31)
    runs["table5/qwen-pairs/R=2/rep0"] = {**runs["table5/qwen/R=2/rep0"], "vote": "pairs"}
    return {"experiments": experiments, "clusters_runs": runs, "benchmark_command": "python benchmarks/results.py",
            "machine": {"cores": 2, "cpu": "AMD EPYC", "ram_gib": 23.5, "gpu": None}, "git_sha": "abc"}


def test_markdown_tables_from_a_fixture():
    text = render.render(fixture_doc())
    row_a = next(line for line in text.splitlines() if line.startswith("| (a)"))
    assert "| 30.0 ± 10.0 | 31.0 ± 10.0 | 10.0 | 0, 1, 2 / 0 |" in row_a
    row_b = next(line for line in text.splitlines() if line.startswith("| (b)"))
    assert "not run (no local LLM)" in row_b and not any(ch.isdigit() for ch in row_b.split("|", 2)[2])
    row_r = next(line for line in text.splitlines() if line.startswith("| Gemma-3-270M | 10 |"))
    assert row_r.startswith("| Gemma-3-270M | 10 | 3 | 2 |") and "25.0" in row_r  # 3 repeats, 2 distinct
    assert "| — / 0.333 |" in row_r  # no z0 recorded; cat~dog split, joined, split: pair agreement 0, 1, 0
    row_q = next(line for line in text.splitlines() if line.startswith("| Qwen2.5-Coder-0.5B-Instruct | 2 |"))
    assert row_q.startswith("| Qwen2.5-Coder-0.5B-Instruct | 2 | 1 | 1 |") and "31.0" in row_q
    row_p = next(line for line in text.splitlines() if line.startswith("| Qwen2.5-Coder-0.5B-Instruct, `clustering"))
    assert "| 2 | 1 | 1 |" in row_p and "31.0" not in row_p  # its own rows: not trained yet
    assert "| voc | train | 3 | 101 (100–102) | 150 |" in text
    assert "GPU: not lent to this task" in text and "AMD EPYC" in text
    assert "pseudo-labels on the 311 train images, DeepLab on the 172 val images" in text


def test_agreement_is_the_mean_rand_index_between_repeats():
    a = {"clusters": [{"name": "x", "members": ["cat", "dog"]}, {"name": "y", "members": ["car", "bus"]}]}
    b = {"clusters": [{"name": "p", "members": ["dog", "cat"]}, {"name": "q", "members": ["bus"]},
                      {"name": "r", "members": ["car"]}]}
    assert render.rand_agreement([a, a]) == 1.0
    assert render.rand_agreement([a, b]) == 5 / 6  # of 6 class pairs only car~bus differs
    assert render.rand_agreement([a]) is None and render.rand_agreement([a, b], "z0") is None


def test_clusters_outcome_reads_z0_or_for_older_files_the_vote_winner(tmp_path):
    first = [{"name": "a", "members": ["cat"]}, {"name": "b", "members": ["dog"]}]
    second = [{"name": "pets", "members": ["cat", "dog"]}]
    vote = {"winner": 1, "histogram": [{"count": 1, "clusters": first}, {"count": 2, "clusters": second}]}
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": first, "vote": vote}))
    assert results.clusters_outcome(tmp_path, tmp_path / "no.log")["z0"] == second
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": first, "vote": {**vote, "z0": first}}))
    outcome = results.clusters_outcome(tmp_path, None)
    assert outcome["z0"] == first and outcome["vote_distinct"] == 2 and outcome["calls"] is None


def test_a_done_clusters_run_gains_z0_from_its_folder_and_keeps_what_only_its_lost_log_said(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "ROOT", tmp_path)
    run = rows.table5_runs(SETTINGS)[0]
    folder = tmp_path / SETTINGS.work_dir / run.name / "clusters"
    folder.mkdir(parents=True)
    pets = [{"name": "pets", "members": ["cat", "dog"]}]
    (folder / "clusters.json").write_text(json.dumps({"clusters": pets, "vote": {"winner": 0, "histogram": [
        {"count": 2, "clusters": pets}]}}))
    store = results.Store(tmp_path / "results.json", tmp_path / "results.md")
    store.doc["clusters_runs"][run.key] = {"status": "done", "command": run.command(SETTINGS), "calls": 12,
                                           "log": "logs/gone.log"}
    entry = results.Runner(SETTINGS, store).clusters(run)
    assert entry["z0"] == pets and entry["calls"] == 12


def test_commands_list_every_invocation_of_a_merged_benchmark():
    doc = fixture_doc()
    assert "python benchmarks/results.py\n```" in render.render(doc)  # one invocation: the one command
    doc["invocations"] = ["python benchmarks/results.py --only table4 --rows a",
                          "python benchmarks/results.py --only sources --out-dir /tmp/b"]
    text = render.render(doc)
    assert "as it was run (in order" in text
    assert "--only table4 --rows a\npython benchmarks/results.py --only sources --out-dir /tmp/b" in text


def test_rerender_keeps_the_hand_written_analysis():
    first = render.render(fixture_doc())
    assert render.ANALYSIS_PLACEHOLDER in first
    edited = first.replace(render.ANALYSIS_PLACEHOLDER, "\nCPC beats the baseline by 2 points.\n")
    again = render.render(fixture_doc(), edited)
    assert "CPC beats the baseline by 2 points." in again and render.ANALYSIS_PLACEHOLDER not in again


# -------------------------------------------------------------------------------------------- runner
def test_finished_row_with_the_same_fingerprints_is_skipped(voc_root, tmp_path, monkeypatch):
    from cpcx.runs import fingerprint

    monkeypatch.setenv("CPCX_DATA", str(voc_root.parent.parent))
    monkeypatch.chdir(rows.ROOT)
    store = results.Store(tmp_path / "results.json", tmp_path / "results.md")
    runner = results.Runner(SETTINGS, store, llms=())
    exp = rows.table4(SETTINGS)[0]
    recipe = runner.recipe(exp.recipe, exp.all_overrides(SETTINGS))
    prints = {s: fingerprint(recipe, s) for s in ("clusters", "train", "pseudo", "segment")}
    store.doc["experiments"][exp.key] = {"status": "done", "fingerprints": prints, "pseudo_miou": 0.3,
                                         "command": "cpcx run (as spelled when it ran)", "overrides": []}
    monkeypatch.setattr(results, "run_measured", lambda *a, **k: pytest.fail("a finished row ran again"))
    kept = runner.experiment(exp)
    assert kept["pseudo_miou"] == 0.3
    # the numbers are kept, the command is today's (here with the class probe switched off, as measured)
    assert kept["command"] == exp.command(SETTINGS) and rows.NO_PROBE in kept["command"]
    assert kept["overrides"] == exp.all_overrides(SETTINGS) and kept["label"] == exp.label
    # another recipe (more epochs) is not the finished row; without the LLM an LLM row is marked, never run
    store.doc["experiments"][exp.key]["fingerprints"]["train"] = "other"
    llm_row = rows.table4(SETTINGS)[3]
    assert runner.experiment(llm_row)["status"] == "not run (no local LLM)"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["experiments"][llm_row.key]["status"] == "not run (no local LLM)"
    assert "not run (no local LLM)" in (tmp_path / "results.md").read_text()


def test_run_measured_reports_the_commands_own_peak_memory(tmp_path):
    ballast = bytearray(300 * 2**20)  # a parent holding memory (torch) must not inflate the child's figure
    big = results.run_measured([sys.executable, "-c", "b = bytearray(200 * 2**20); import sys; sys.exit(3)"],
                               tmp_path / "big.log", results.child_env())
    small = results.run_measured([sys.executable, "-c", "pass"], tmp_path / "small.log", results.child_env())
    assert big.returncode == 3 and big.max_rss_mib >= 200
    assert small.returncode == 0 and small.max_rss_mib < 100 and len(ballast)


def test_quick_settings_and_bad_sections():
    quick = results.settings_from(results.parse_args(["--quick"]))
    assert quick.work_dir == "runs-bench-quick" and quick.seeds == (0,) and "dataset.limit=24" in quick.extra
    full = results.settings_from(results.parse_args(["--seeds", "3", "4", "--segment-seeds", "4"]))
    assert full.seeds == (3, 4) and full.segment_seeds == (4,) and full.extra == () and full.work_dir == "runs-bench"
    with pytest.raises(SystemExit):
        results.parse_args(["--only", "table9"])
    with pytest.raises(SystemExit):
        results.parse_args(["--t5-llms", "gemma,gpt5"])
    assert results.settings_from(results.parse_args(["--t5-llms", "qwen"])).t5_llms == ("qwen",)


def test_rows_option_runs_only_those_table4_rows(tmp_path):
    store = results.Store(tmp_path / "results.json", tmp_path / "results.md")
    ran: list[str] = []

    class Recording(results.Runner):
        def experiment(self, exp):
            ran.append(exp.key)
            return {}

    results.run_sections(Recording(SETTINGS, store, llms=(), rows=["e", "f"]), ["table4"])
    assert ran == [f"table4/{r}/s{s}" for r in "ef" for s in (0, 1, 2)]
    ran.clear()
    results.run_sections(Recording(SETTINGS, store, llms=()), ["table4"])
    assert len(ran) == 10 * 3


def test_a_merge_without_the_llm_keeps_the_llms_its_kept_rows_were_made_with():
    gemma = {"available": True, "note": "Gemma-3-270M at http://127.0.0.1:8766/v1"}  # as files before models
    kept = results.llm_record(gemma, {}, "none (--no-llm)")
    assert kept["note"] == gemma["note"] and kept["models"] == {"gemma": gemma["note"]}
    both = results.llm_record(kept, {"qwen": "Qwen at :8767"}, "")  # a merge that served only Qwen keeps Gemma
    assert both["note"] == "Gemma-3-270M at http://127.0.0.1:8766/v1; Qwen at :8767"
    assert results.llm_record(both, {"gemma": "Gemma, new server"}, "")["models"]["gemma"] == "Gemma, new server"
    assert results.llm_record(None, {}, "none (--no-llm)") == {"available": False, "note": "none (--no-llm)"}
    assert results.llm_record({"available": False, "note": "none"}, {}, "none (--no-llm)")["note"] == "none (--no-llm)"
    assert results.llms_needed(SETTINGS, ["table4"], ["e", "f"]) == set()  # rows that need no server start none
    assert results.llms_needed(SETTINGS, ["table4"], ["b", "j"]) == {"gemma", "qwen"}
    assert results.llms_needed(SETTINGS, ["sources"], []) == {"gemma", "qwen"}
    assert results.llms_needed(SETTINGS, ["coco", "speed"], []) == {"gemma"}