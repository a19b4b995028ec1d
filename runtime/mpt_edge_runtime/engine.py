"""The engine: one graph, many tasks. Classify texts for one task, or a batch whose rows mix tasks.

    engine = mpt_edge_runtime.load("bundle/", device="cpu")
    engine.classify("sentiment", ["great film", "dull"])        # → [Prediction, Prediction]
    engine.run([("sentiment", "great"), ("topic", "goal!")])    # one batch, results in request order
    engine.generate("answer", ["Q: 2 + 2?"], max_new_tokens=8)  # bundles with a generation graph
    for piece in engine.stream("answer", "Q: 3 + 4?"): ...      # text pieces as they are generated
    engine.add_task("new_task", "new_task.safetensors")         # hot-load factors; the graph is untouched

With a generation graph (causal bundles exported with a KV cache), each task's prompt KV is computed once
when the task is loaded; every request, classify or generate, starts from it, so the prompt never re-runs.

Thread safety: the task table is replaced, never mutated, under a lock; onnxruntime sessions and
tokenizers are safe to call concurrently, so concurrent calls give the same answers as serial ones.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors
from tokenizers import Tokenizer

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.bundle import TaskEntry, graph_kind, read_manifest, read_tasks, task_entry
from mpt_edge_runtime.errors import BundleError, InputError, UnknownTaskError
from mpt_edge_runtime.generation import DecoderSession, Seq2SeqSession, decode, label_log_probs, right_padded
from mpt_edge_runtime.sampling import SamplingConfig
from mpt_edge_runtime.session import GraphSession
from mpt_edge_runtime.text import TextError, encode_example, plain_tokenizer, special_tokens


@dataclass(frozen=True)
class Prediction:
    """The predicted label of one text, its probability, and every label's probability."""

    task: str
    label: str
    score: float
    probabilities: dict[str, float] = field(repr=False)


class Engine:
    """Serves every task of a bundle from one onnxruntime session."""

    def __init__(self, session: GraphSession | None, tokenizer: Tokenizer, manifest: dict, tasks: Iterable[TaskEntry],
                 groups: dict[str, np.ndarray], batch_size: int = 32,
                 decoder: DecoderSession | Seq2SeqSession | None = None):
        self.session, self.tokenizer, self.manifest = session, plain_tokenizer(tokenizer), manifest
        self.groups = groups
        self.batch_size = batch_size
        self.decoder = decoder
        self._specials = special_tokens(self.tokenizer)
        self._tasks = {t.name: self._ready(t) for t in tasks}
        self._lock = threading.Lock()

    @property
    def tasks(self) -> list[str]:
        return sorted(self._tasks)

    @property
    def device(self) -> str:
        return (self.decoder.graph if self.decoder is not None else self.session).device

    def task(self, name: str) -> TaskEntry:
        tasks = self._tasks
        if not isinstance(name, str) or name not in tasks:
            raise UnknownTaskError(name, tasks)
        return tasks[name]

    def classify(self, task: str, texts: Sequence[str]) -> list[Prediction]:
        """Label each text with `task`; returns one Prediction per text, in order."""
        _check_texts(texts)
        self.task(task)
        return self.run([(task, text) for text in texts])

    def generate(self, task: str, texts: Sequence[str], max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] = ()) -> list[str]:
        """Continue each text with `task`'s prompt: greedy (temperature 0) or sampled; one string per text."""
        _check_texts(texts)
        self.task(task)
        return self.generate_batch([(task, text) for text in texts], max_new_tokens, temperature, top_k, top_p,
                                   seed, stop)

    def stream(self, task: str, text: str, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int | None = None, stop: str | Sequence[str] = ()) -> Iterator[str]:
        """Yield the generated text of one request piece by piece, as tokens are produced."""
        for _, piece in self.stream_batch([(task, text)], max_new_tokens, temperature, top_k, top_p, seed, stop):
            yield piece

    def generate_batch(self, requests: Sequence[tuple[str, str]], max_new_tokens: int = 32, temperature: float = 0.0,
                       top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                       stop: str | Sequence[str] = ()) -> list[str]:
        """One batch whose rows may belong to different generate tasks → one string per request, in order."""
        texts = [""] * len(requests)
        for i, piece in self.stream_batch(requests, max_new_tokens, temperature, top_k, top_p, seed, stop):
            texts[i] += piece
        return texts

    def stream_batch(self, requests: Sequence[tuple[str, str]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop: str | Sequence[str] = ()) -> Iterator[tuple[int, str]]:
        """Generate for every request in one batch; yield (request index, text piece) as pieces are ready."""
        config = SamplingConfig(max_new_tokens, temperature, top_k, top_p, seed, stop)
        if self.decoder is None:
            raise BundleError("this bundle has no generation graph; re-export it with `mpt-edge export --kv-cache` "
                              "(causal and seq2seq backbones)")
        rows = self._encode(requests, kind="generate")
        limit = self.manifest["backbone"].get("max_positions")
        prefix = self.manifest["prompt"]["length"]
        for i, (_, ids) in enumerate(rows):
            if limit and prefix + len(ids) + config.max_new_tokens > limit:
                raise InputError(f"request {i}: prompt {prefix} + input {len(ids)} + max_new_tokens "
                                 f"{config.max_new_tokens} tokens exceed the backbone's {limit} positions; "
                                 "lower max_new_tokens or the task's max_length")
        eos = self.manifest["graph"].get("eos_token_ids", [])
        streams = [_TextStream(self.tokenizer, config.stop) for _ in rows]
        steps = decode(self.decoder, [(entry.prefix, ids) for entry, ids in rows], config, eos)
        for tokens in steps:
            for i, token in enumerate(tokens):
                if not streams[i].done:
                    piece = streams[i].push(int(token), int(token) in eos)
                    if piece:
                        yield i, piece
            if all(s.done for s in streams):
                break
        for i, stream in enumerate(streams):
            piece = stream.finish()
            if piece:
                yield i, piece

    def run(self, requests: Sequence[tuple[str, str]]) -> list[Prediction]:
        """One batch whose rows may belong to different classify tasks: [(task, text), ...] → Predictions in order."""
        rows = self._encode(requests, kind="classify")
        order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # similar lengths share a batch
        results: list[Prediction | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, prediction in zip(chunk, self._forward([rows[i] for i in chunk])):
                results[i] = prediction
        return results

    def _encode(self, requests: Sequence[tuple[str, str]], kind: str) -> list[tuple[TaskEntry, list[int]]]:
        """Check every request and tokenize it with its task's template → [(task entry, ids), ...]."""
        if isinstance(requests, (str, bytes)) or not isinstance(requests, Sequence) or not requests:
            raise InputError("requests must be a non-empty list of (task, text) pairs")
        tasks = self._tasks  # one consistent snapshot for the whole call
        rows = []
        for i, request in enumerate(requests):
            if not (isinstance(request, (tuple, list)) and len(request) == 2):
                raise InputError(f"request {i} must be a (task, text) pair, got {request!r}")
            name, text = request
            if not isinstance(name, str) or name not in tasks:
                raise UnknownTaskError(name, tasks)
            if not isinstance(text, str):
                hint = " (decode bytes first, e.g. data.decode('utf-8', errors='replace'))" if isinstance(text, bytes) else ""
                raise InputError(f"request {i}: text must be a string, got {type(text).__name__}{hint}")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    raise InputError(f"request {i}: the text holds a lone surrogate {text[err.start]!r} at character "
                                     f"{err.start}, which is not valid Unicode; decode the input with "
                                     "errors='replace'") from None
            entry = tasks[name]
            if entry.kind != kind:
                verb = "engine.generate / stream" if entry.kind == "generate" else "engine.classify / run"
                raise InputError(f"request {i}: task {name!r} is a {entry.kind} task; use {verb}")
            try:
                ids = encode_example(self.tokenizer, entry.template, {"text": text}, entry.max_length, self._specials)
            except TextError as err:
                raise InputError(f"request {i}: {err}") from None
            if not ids:
                raise InputError(f"request {i}: the text is empty and task {name!r}'s template adds no tokens; "
                                 "give some text")
            rows.append((entry, ids))
        return rows

    def _ready(self, entry: TaskEntry) -> TaskEntry:
        """With generation graphs: the task with its request prefix (causal: the prompt KV) computed once, here."""
        if self.decoder is None:
            return entry
        return replace(entry, prefix=self.decoder.prefix(entry.prompt))

    def _forward(self, rows: list[tuple[TaskEntry, list[int]]]) -> list[Prediction]:
        if self.decoder is not None:  # causal: from each task's cached prompt KV, the prompt does not run again
            _, features, _ = self.decoder.start([(entry.prefix, ids) for entry, ids in rows])
            predictions = [_predict(entry, row) for (entry, _), row in zip(rows, features)]
            whole = [i for i, (entry, _) in enumerate(rows) if entry.label_tokens]
            if whole:  # whole-sequence verbalizers: label log-probabilities replace the head's logits
                scores = label_log_probs(self.decoder, [(rows[i][0].prefix, rows[i][1], rows[i][0].label_tokens)
                                                        for i in whole])
                for i, logits in zip(whole, scores):
                    predictions[i] = _from_logits(rows[i][0], logits)
            return predictions
        input_ids, mask = right_padded([ids for _, ids in rows])
        prompts = np.stack([entry.prompt for entry, _ in rows])
        features = self.session.features(input_ids, mask, prompts)
        return [_predict(entry, row) for (entry, _), row in zip(rows, features)]

    def add_task(self, name: str, factors: str | Path) -> None:
        """Hot-load a task from a factors file (`mpt-edge export-task` / `write_task_file`); replaces a same-name task."""
        entry = self._ready(read_task_file(Path(factors), self.manifest, self.groups, name))
        with self._lock:
            self._tasks = {**self._tasks, entry.name: entry}

    def remove_task(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise UnknownTaskError(name, self._tasks)
            self._tasks = {k: v for k, v in self._tasks.items() if k != name}


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a list of strings, got {type(texts).__name__}; wrap one text in a list")


class _TextStream:
    """One row's generated text, released in pieces that never split a character or pass a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0          # characters already yielded
        self.done = False

    def push(self, token: int, is_eos: bool) -> str:
        if is_eos:
            return self.finish()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            self.done = True
            return self._release(text[:cut])
        # hold back what could still become a stop string, and an incomplete UTF-8 character
        hold = max((len(s) - 1 for s in self.stop), default=0)
        ready = len(text) - hold if hold else len(text)
        while ready > self.sent and text[ready - 1] == "\ufffd":
            ready -= 1
        return self._release(text[:max(ready, self.sent)])

    def finish(self) -> str:
        if self.done:
            return ""
        self.done = True
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        return self._release(text[:cut] if cut >= 0 else text)

    def _release(self, text: str) -> str:
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece


def _predict(entry: TaskEntry, features: np.ndarray) -> Prediction:
    return _from_logits(entry, entry.head_weight @ features + entry.head_bias)


def _from_logits(entry: TaskEntry, logits: np.ndarray) -> Prediction:
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    best = int(np.argmax(probs))
    return Prediction(entry.name, entry.labels[best], float(probs[best]),
                      {label: float(p) for label, p in zip(entry.labels, probs)})


def read_task_file(path: Path, manifest: dict, groups: dict[str, np.ndarray], name: str | None = None) -> TaskEntry:
    """A single-task factors file: safetensors with u, v, head.weight, head.bias and either its own `shared`
    or metadata naming a bundle group; the task spec is JSON in the file's metadata under "task"."""
    if not path.is_file():
        raise BundleError(f"task file {path} does not exist")
    data = path.read_bytes()
    try:
        header_length = int.from_bytes(data[:8], "little")
        spec = json.loads(json.loads(data[8:8 + header_length])["__metadata__"]["task"])
        tensors = load_tensors(data)
    except (ValueError, KeyError, TypeError, SafetensorError) as err:  # damaged or foreign file: say which and why
        raise BundleError(f"{path} is not an mpt-edge task file ({type(err).__name__}: {err})") from None
    spec["name"] = name or spec["name"]
    keyed = {fmt.task_key(spec["name"], part): tensors[part] for part in ("u", "v", "head.weight", "head.bias")
             if part in tensors}
    if "shared" in tensors:
        spec["group"] = f"{spec['name']}-own"
        keyed[fmt.shared_key(spec["group"])] = tensors["shared"]
    elif str(spec.get("group")) in groups:
        keyed[fmt.shared_key(spec["group"])] = groups[str(spec["group"])]
    else:
        raise BundleError(f"{path}: task {spec['name']!r} has no shared prompt of its own and names group "
                          f"{spec.get('group')!r}, which this bundle lacks (groups: {sorted(groups)})")
    return task_entry(spec, keyed, manifest, str(path))


def load(bundle: str | Path, device: str = "auto", *, threads: int | None = None, batch_size: int = 32) -> Engine:
    """Open a bundle folder: verify it, compose every task's prompt, start the session on `device`."""
    folder = Path(bundle)
    manifest = read_manifest(folder)
    tasks, groups = read_tasks(folder, manifest)
    decoder, session = None, GraphSession.open(folder / manifest["graph"]["file"], device, threads)
    _check_graph(session, manifest, folder)
    if graph_kind(manifest) == fmt.DECODER_KIND:  # the generation graph serves every task, classify included
        decoder, session = DecoderSession.open(session, manifest["prompt"]["hidden_size"]), None
    elif graph_kind(manifest) == fmt.SEQ2SEQ_KIND:
        step = GraphSession.open(folder / manifest["graph"]["decoder_file"], device, threads)
        _check_step_graph(step, folder / manifest["graph"]["decoder_file"])
        decoder, session = Seq2SeqSession.open(session, step), None
    tokenizer = Tokenizer.from_file(str(folder / fmt.TOKENIZER))
    return Engine(session, tokenizer, manifest, tasks, groups, batch_size, decoder)


def _check_step_graph(step: GraphSession, path: Path) -> None:
    names = {i.name for i in step.session.get_inputs()}
    cached = {n for n in names if n.startswith(("past.", "cross."))}
    if names - cached != set(fmt.SEQ2SEQ_STEP_INPUTS) or not cached:
        raise BundleError(f"{path} has inputs {sorted(names)}, expected {sorted(fmt.SEQ2SEQ_STEP_INPUTS)} and "
                          "past.<i>.key/value, cross.<i>.key/value; re-export")


def _check_graph(session: GraphSession, manifest: dict, folder: Path) -> None:
    path = folder / manifest["graph"]["file"]
    inputs = {i.name: i.shape for i in session.session.get_inputs()}
    decoder = graph_kind(manifest) == fmt.DECODER_KIND
    expected = set(fmt.DECODER_INPUTS if decoder else fmt.GRAPH_INPUTS)
    if set(inputs) - {n for n in inputs if decoder and n.startswith("past.")} != expected:
        raise BundleError(f"{path} has inputs {sorted(inputs)}, expected {sorted(expected)}"
                          f"{' and past.<i>.key/value' if decoder else ''}; re-export")
    dim = inputs[fmt.PROMPT_EMBEDS][-1]
    if isinstance(dim, int) and dim != manifest["prompt"]["hidden_size"]:
        raise BundleError(f"{path} takes prompts of hidden size {dim}, but {fmt.MANIFEST} says "
                          f"{manifest['prompt']['hidden_size']}; the bundle is inconsistent, re-export it")
