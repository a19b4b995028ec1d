"""Every bundle file is verified on every load, fast (issue 15, item 4): hashing runs beside the session's start,
and a verified stamp (file identity → digest, HMAC under a per-user key) spares rehashing unchanged files.
A changed byte is refused with or without a stamp, a tampered or foreign stamp is ignored, a mismatch is a
BundleError before any graph runs, and concurrent loads write one valid stamp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import mpt_edge_runtime as mer
from mpt_edge_runtime import engine as engine_module
from mpt_edge_runtime import verification
from mpt_edge_runtime.session import GraphSession
from mpt_edge_runtime.verification import KEY_FILE, StampStore

FIXTURES = Path(__file__).parent / "fixtures" / "bundles"
RACY_NS = 30_000_000          # tests: a file older than 30 ms may be stamped (coarse file times tick <= 10 ms)
MISMATCH = "does not match its sha256"


@pytest.fixture(autouse=True)
def short_racy_window(monkeypatch):
    monkeypatch.setattr(verification, "RACY_NS", RACY_NS)


def settle() -> None:
    """Let file times age past the racy window, and the coarse clock tick, before stamping or changing files."""
    time.sleep(3 * RACY_NS / 1e9)


@pytest.fixture(params=["v2-features", "v2-decoder"])
def bundle(request, tmp_path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(FIXTURES / request.param, out)
    settle()
    return out


@pytest.fixture
def store(tmp_path) -> StampStore:
    return StampStore(tmp_path / "cache")


def files_of(bundle: Path) -> list[str]:
    return sorted(json.loads((bundle / "manifest.json").read_text())["files"])


def flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    with open(path, "r+b") as handle:      # in place: same inode and size, new mtime and ctime
        handle.write(bytes(data))


def initializer_offset(graph: Path) -> int:
    """An offset inside the graph's largest weight: a flip there still parses, so only the hash can catch it."""
    import onnx
    model = onnx.load(str(graph))
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    assert len(raw) > 64
    return graph.read_bytes().index(raw) + len(raw) // 2


def test_a_second_load_hashes_nothing_and_answers_the_same(bundle, store):
    first = mer.load(bundle, "cpu", threads=1, stamps=store)
    assert sorted(first.load_report.hashed) == files_of(bundle) and first.load_report.stamped == ()
    second = mer.load(bundle, "cpu", threads=1, stamps=store)
    assert second.load_report.hashed == () and sorted(second.load_report.stamped) == files_of(bundle)
    task = next(t for t in first.tasks if first.task(t).kind == "classify")
    assert first.classify(task, ["a fine film"]) == second.classify(task, ["a fine film"])


@pytest.mark.parametrize("use_stamp", [False, True], ids=["no-stamp", "stamped"])
def test_a_changed_byte_is_refused_with_and_without_a_stamp(bundle, store, use_stamp):
    stamps = store if use_stamp else False
    mer.load(bundle, "cpu", threads=1, stamps=stamps)
    for name in files_of(bundle):
        original = (bundle / name).read_bytes()
        settle()
        flip(bundle / name)
        with pytest.raises(mer.BundleError, match=rf"{name} {MISMATCH}"):
            mer.load(bundle, "cpu", threads=1, stamps=stamps)
        (bundle / name).write_bytes(original)
        settle()
        engine = mer.load(bundle, "cpu", threads=1, stamps=stamps)
        if use_stamp:      # only the rewritten file is hashed again: the others still match their stamp
            assert engine.load_report.hashed == (name,)
        else:
            assert sorted(engine.load_report.hashed) == files_of(bundle)


def test_a_change_that_restores_size_and_mtime_is_still_refused(bundle, store):
    mer.load(bundle, "cpu", threads=1, stamps=store)
    graph = bundle / mer.load(bundle, "cpu", threads=1, stamps=store).manifest.graph.file
    before = os.stat(graph)
    settle()
    flip(graph, initializer_offset(graph))
    os.utime(graph, ns=(before.st_atime_ns, before.st_mtime_ns))       # what `touch -d` / `cp -p` can do
    after = os.stat(graph)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    assert after.st_ctime_ns != before.st_ctime_ns                      # ctime cannot be set back
    with pytest.raises(mer.BundleError, match=MISMATCH):
        mer.load(bundle, "cpu", threads=1, stamps=store)


def _stamp_path(store: StampStore, bundle: Path) -> Path:
    path = store._path(bundle.resolve())
    assert json.loads(path.read_text())["folder"] == str(bundle.resolve())
    return path


def test_a_tampered_stamp_cannot_make_a_changed_file_pass(bundle, store):
    mer.load(bundle, "cpu", threads=1, stamps=store)
    graph_name = mer.load(bundle, "cpu", threads=1, stamps=store).manifest.graph.file
    stamp_path = _stamp_path(store, bundle)
    settle()
    graph = bundle / graph_name
    flip(graph, initializer_offset(graph))
    stamp = json.loads(stamp_path.read_text())
    stamp["files"][graph_name][1] = verification.identity(os.lstat(graph))   # vouch for the changed file
    stamp_path.write_text(json.dumps(stamp))
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=store)
    # re-signed with another key (a stamp written elsewhere, or by someone without this user's key)
    body = {k: v for k, v in stamp.items() if k != "mac"}
    stamp_path.write_text(json.dumps({**body, "mac": StampStore._mac(b"k" * 32, body)}))
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=store)
    # re-signed with the right key, but the stamp names another digest than the manifest: hashed, refused
    key = (store.folder / KEY_FILE).read_bytes()
    body["files"][graph_name][0] = "0" * 64
    stamp_path.write_text(json.dumps({**body, "mac": StampStore._mac(key, body)}))
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=store)


def test_a_copied_bundle_or_a_stamp_of_another_folder_vouches_for_nothing(bundle, store, tmp_path):
    mer.load(bundle, "cpu", threads=1, stamps=store)
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    settle()
    assert sorted(mer.load(copy, "cpu", threads=1, stamps=store).load_report.hashed) == files_of(bundle)
    # the stamp of `bundle` moved to `copy`'s name: its folder does not match
    stamp_path = _stamp_path(store, bundle)
    other = store._path(copy.resolve())
    other.unlink()
    os.replace(stamp_path, other)
    assert sorted(mer.load(copy, "cpu", threads=1, stamps=store).load_report.hashed) == files_of(bundle)


def test_a_key_others_could_read_or_a_cache_that_cannot_be_written_means_hashing_every_load(bundle, store, tmp_path):
    mer.load(bundle, "cpu", threads=1, stamps=store)
    os.chmod(store.folder / KEY_FILE, 0o644)
    assert sorted(mer.load(bundle, "cpu", threads=1, stamps=store).load_report.hashed) == files_of(bundle)
    under_a_file = tmp_path / "a-file"
    under_a_file.write_text("")
    for _ in range(2):
        engine = mer.load(bundle, "cpu", threads=1, stamps=StampStore(under_a_file / "cache"))
        assert sorted(engine.load_report.hashed) == files_of(bundle)


def test_files_changed_within_the_racy_window_are_not_stamped(bundle, store, monkeypatch):
    monkeypatch.setattr(verification, "RACY_NS", 500_000_000)
    time.sleep(0.6)                                                  # the copied files are older than that
    (bundle / "tasks.json").write_bytes((bundle / "tasks.json").read_bytes())   # rewritten just now
    mer.load(bundle, "cpu", threads=1, stamps=store)
    assert mer.load(bundle, "cpu", threads=1, stamps=store).load_report.hashed == ("tasks.json",)


def test_stamps_are_pruned_to_the_most_recent(store, tmp_path, monkeypatch):
    monkeypatch.setattr(verification, "MAX_STAMPS", 2)
    for i in range(3):
        shutil.copytree(FIXTURES / "v2-features", tmp_path / f"b{i}")
    settle()
    for i in range(3):
        mer.load(tmp_path / f"b{i}", "cpu", threads=1, stamps=store)
        time.sleep(0.02)
    kept = {json.loads(p.read_text())["folder"] for p in (store.folder / "stamps").glob("*.json")}
    assert kept == {str((tmp_path / f"b{i}").resolve()) for i in (1, 2)}


def test_hashing_runs_beside_the_session_and_a_mismatch_is_refused_before_any_graph_runs(bundle, store,
                                                                                         monkeypatch):
    graph_name = json.loads((bundle / "manifest.json").read_text())["graph"]["file"]
    hashing, opening = threading.Event(), threading.Event()
    real_hash, real_open, real_run = verification.file_sha256, GraphSession.open.__func__, GraphSession.run
    runs = []

    def slow_hash(path):
        if Path(path).name == graph_name:
            hashing.set()
            assert opening.wait(20), "the session did not start while the graph was being hashed"
        return real_hash(path)

    def open_session(cls, *args, **kwargs):
        opening.set()
        assert hashing.wait(20), "the graph was not hashed while the session started"
        return real_open(cls, *args, **kwargs)

    monkeypatch.setattr(verification, "file_sha256", slow_hash)
    monkeypatch.setattr(GraphSession, "open", classmethod(open_session))
    monkeypatch.setattr(GraphSession, "run", lambda self, *a, **k: runs.append(1) or real_run(self, *a, **k))
    engine = mer.load(bundle, "cpu", threads=1, stamps=False)     # both waits pass: the two ran at once
    assert engine.load_report.hashed and graph_name in engine.load_report.hashed
    runs.clear()
    flip(bundle / graph_name, initializer_offset(bundle / graph_name))
    real_open(GraphSession, bundle / graph_name, "cpu", 1)           # onnxruntime still opens it: the hash decides
    hashing.clear(), opening.clear()
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=False)
    assert runs == []                                               # no graph ran: no prefix, no answer


def test_on_one_cpu_every_file_is_hashed_before_the_session_starts(bundle, monkeypatch):
    graph_name = json.loads((bundle / "manifest.json").read_text())["graph"]["file"]
    monkeypatch.setattr(engine_module, "_cpus", lambda: 1)
    opened = []
    real_open = GraphSession.open.__func__
    monkeypatch.setattr(GraphSession, "open",
                        classmethod(lambda cls, *a, **k: opened.append(1) or real_open(cls, *a, **k)))
    assert sorted(mer.load(bundle, "cpu", threads=1).load_report.hashed) == files_of(bundle)
    flip(bundle / graph_name)
    opened.clear()
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1)
    assert opened == []                    # refused before onnxruntime read the changed graph


def test_a_graph_onnxruntime_cannot_read_is_reported_as_the_changed_file(bundle):
    graph_name = json.loads((bundle / "manifest.json").read_text())["graph"]["file"]
    path = bundle / graph_name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])    # truncated: onnxruntime fails too
    with pytest.raises(mer.BundleError, match=rf"{graph_name} {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=False)


def test_read_manifest_verifies_with_the_stamp_too(bundle, store):
    from mpt_edge_runtime.bundle import read_manifest
    read_manifest(bundle, stamps=store)
    assert mer.load(bundle, "cpu", threads=1, stamps=store).load_report.hashed == ()
    settle()
    flip(bundle / "tasks.json", 0)
    with pytest.raises(mer.BundleError, match=f"tasks.json {MISMATCH}"):
        read_manifest(bundle, stamps=store)


LOADER = r"""
import sys, time
from mpt_edge_runtime import verification
verification.RACY_NS = 30_000_000
import mpt_edge_runtime as mer
bundle, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
for _ in range(4):
    engine = mer.load(bundle, "cpu", threads=1, stamps=True)
    engine.classify(next(t for t in engine.tasks if engine.task(t).kind == "classify"), ["a fine film"])
print("ok")
"""


def test_processes_loading_at_once_share_one_key_and_leave_a_valid_stamp(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(FIXTURES / "v2-features", bundle)
    cache = tmp_path / "cache"
    env = {**os.environ, verification.CACHE_ENV: str(cache)}
    settle()
    start = time.time() + 2.0          # both processes start loading at the same instant, with no key yet
    procs = [subprocess.Popen([sys.executable, "-c", LOADER, str(bundle), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert sorted(p.name for p in cache.iterdir()) == [KEY_FILE, "stamps"]          # no temp files left
    assert len(list((cache / "stamps").iterdir())) == 1
    store = StampStore(cache)
    assert mer.load(bundle, "cpu", threads=1, stamps=store).load_report.hashed == ()
    settle()
    flip(bundle / "prompts.safetensors")
    with pytest.raises(mer.BundleError, match=f"prompts.safetensors {MISMATCH}"):
        mer.load(bundle, "cpu", threads=1, stamps=store)


def test_stamps_are_opt_in_and_go_to_the_cache_folder(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv(verification.CACHE_ENV, str(tmp_path / "env-cache"))
    for _ in range(2):     # the default hashes every file, every load, and writes nothing
        assert sorted(mer.load(bundle, "cpu", threads=1).load_report.hashed) == files_of(bundle)
    assert not (tmp_path / "env-cache").exists()
    mer.load(bundle, "cpu", threads=1, stamps=True)
    assert mer.load(bundle, "cpu", threads=1, stamps=True).load_report.hashed == ()
    assert (tmp_path / "env-cache" / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(mer.load(bundle, "cpu", threads=1).load_report.hashed) == files_of(bundle)
    assert type(mer.load(bundle, "cpu", threads=1).load_report) is engine_module.LoadReport
