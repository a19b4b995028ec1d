"""The bundle manifest (`manifest.json`) as typed data: checked once when read, attributes after that.

    manifest = Manifest.from_json(json.loads(text), where="bundle/manifest.json")   # BundleError if malformed
    manifest.format_version, manifest.graph.kind, manifest.prompt.length, manifest.files["tokenizer.json"]
    json.dumps(manifest.to_json(), indent=2) + "\n"      # the bytes `mpt-edge export` writes

Keys this runtime does not know are kept (`extra`), and a section read from JSON remembers its keys and their
order, so `Manifest.from_json(d).to_json() == d`, key order included: what is written is what was read.
The parity, options and versions reports are descriptive and stay plain dicts.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from mpt_edge_runtime import format as fmt
from mpt_edge_runtime.errors import BundleError

_NONE = type(None)
_REEXPORT = "re-export the bundle with `mpt-edge export`"
# graph kind → the graph file it serves from (seq2seq also has fmt.DECODER_GRAPH as "decoder_file")
GRAPH_FILES = {fmt.FEATURES_KIND: fmt.GRAPH, fmt.DECODER_KIND: fmt.DECODER_GRAPH, fmt.FUSED_DECODER_KIND: fmt.DECODER_GRAPH,
               fmt.SEQ2SEQ_KIND: fmt.ENCODER_GRAPH}


def _key(types: tuple, default=MISSING, *, items: type | None = None, section: type | None = None,
         omit_none: bool = False):
    """A manifest key: the JSON types it may hold (`items`: a list's element type, read as a tuple; `section`: the
    class an object is read as), its default (none: required; `dict`: an empty dict), and whether a section built
    in code leaves it out while it is None."""
    factory = dict if default is dict else MISSING
    return field(default=MISSING if factory is not MISSING else default, default_factory=factory,
                 metadata={"types": types, "items": items, "section": section, "omit_none": omit_none})


def _type_names(types: tuple) -> str:
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list", _NONE: "null"}
    return " or ".join(names[t] for t in types)


class _Section:
    """A JSON object with typed keys, unknown keys kept in `extra`, and the key order it was read with."""

    extra: dict
    order: tuple | None

    @classmethod
    def from_json(cls, data: object, where: str, name: str):
        if not isinstance(data, dict):
            raise BundleError(f"{where}: {name!r} must be an object, got {type(data).__name__}; {_REEXPORT}")
        values = {}
        for f in fields(cls):
            if "types" not in f.metadata:
                continue
            path = f"{name}.{f.name}" if name else f.name
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise BundleError(f"{where} lacks {path}: the manifest is incomplete; {_REEXPORT}")
                continue
            values[f.name] = _checked(data[f.name], f.metadata, where, path)
        known = {f.name for f in fields(cls)}
        return cls(**values, extra={k: v for k, v in data.items() if k not in known}, order=tuple(data))

    def to_json(self) -> dict:
        """The JSON object: read keys in their order (absent ones stay absent), or, for a section built in code,
        every key in field order but those left out while None; unknown keys after the known ones."""
        out = {}
        for f in fields(self):
            if "types" not in f.metadata:
                continue
            value = getattr(self, f.name)
            if self.order is not None:
                if f.name not in self.order:
                    continue
            elif value is None and f.metadata["omit_none"]:
                continue
            out[f.name] = _plain(value)
        out.update(self.extra)
        if self.order is not None:
            out = {**{k: out[k] for k in self.order if k in out}, **{k: v for k, v in out.items() if k not in self.order}}
        return out


def _plain(value: object) -> object:
    """A field's JSON value: sections as objects, tuples as lists."""
    if isinstance(value, _Section):
        return value.to_json()
    return list(value) if isinstance(value, tuple) else value


def _checked(value: object, meta: dict, where: str, name: str) -> object:
    types, items = meta["types"], meta["items"]
    if isinstance(value, bool) or not isinstance(value, types):
        raise BundleError(f"{where}: {name} must be {_type_names(types)}, got {value!r}; {_REEXPORT}")
    if meta["section"] is not None:
        return meta["section"].from_json(value, where, name)
    if items is not None and isinstance(value, list):
        if not all(isinstance(v, items) and not isinstance(v, bool) for v in value):
            plural = {int: "integers", str: "strings"}[items]
            raise BundleError(f"{where}: {name} must be a list of {plural}, got {value!r}; {_REEXPORT}")
        return tuple(value)
    return value


_OPT_INT, _OPT_STR = (int, _NONE), (str, _NONE)


@dataclass(frozen=True, kw_only=True)
class BackboneInfo(_Section):
    """What the graph was exported from (descriptive; the runtime uses max_positions only)."""

    name: str | None = _key(_OPT_STR, None)
    model_type: str | None = _key(_OPT_STR, None)
    hidden_size: int | None = _key(_OPT_INT, None)
    num_layers: int | None = _key(_OPT_INT, None)
    num_heads: int | None = _key(_OPT_INT, None)
    num_kv_heads: int | None = _key(_OPT_INT, None)
    vocab_size: int | None = _key(_OPT_INT, None)
    max_positions: int | None = _key(_OPT_INT, None)   # prompt + input + new tokens must fit (None: no limit)
    extra: dict = field(default_factory=dict, repr=False)
    order: tuple | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class GraphEntry(_Section):
    """The bundle's graph: `kind` says which ("features"; "decoder": causal with a KV cache; "decoder-fused": the
    same with onnxruntime's fused ops; "seq2seq": `file` is the encoder + decoder step 0 and `decoder_file` one
    decoder step). inputs/outputs: name → dynamic axis names."""

    kind: str = _key((str,), fmt.FEATURES_KIND)   # absent in bundles written before generation: the features graph
    file: str = _key((str,))
    decoder_file: str | None = _key(_OPT_STR, None, omit_none=True)
    eos_token_ids: tuple[int, ...] | None = _key((list, _NONE), None, items=int, omit_none=True)
    inputs: dict | None = _key((dict, _NONE), None, omit_none=True)
    decoder_inputs: dict | None = _key((dict, _NONE), None, omit_none=True)
    outputs: tuple[str, ...] | None = _key((list, _NONE), None, items=str, omit_none=True)
    opset: int | None = _key(_OPT_INT, None, omit_none=True)
    dtype: str = _key((str,), "fp32")
    optimize: str | None = _key(_OPT_STR, None, omit_none=True)
    quantize: dict | None = _key((dict, _NONE), None, omit_none=True)
    extra: dict = field(default_factory=dict, repr=False)
    order: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def files(self) -> tuple[str, ...]:
        """The graph files this entry needs: (file,) or, for seq2seq, (file, decoder_file)."""
        return (self.file, self.decoder_file) if self.kind == fmt.SEQ2SEQ_KIND else (self.file,)


@dataclass(frozen=True, kw_only=True)
class PromptInfo(_Section):
    """Every task's composed prompt is (length, hidden_size); `groups` shared prompts P*."""

    length: int = _key((int,))
    hidden_size: int = _key((int,))
    groups: int | None = _key(_OPT_INT, None)
    extra: dict = field(default_factory=dict, repr=False)
    order: tuple | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True)
class Manifest(_Section):
    """`manifest.json`: format version, family, backbone facts, the graph, prompt shape, the sha256 of every file
    (name → hex digest), and the export's parity report, options and tool versions."""

    format_version: int = _key((int,))
    family: str = _key((str,))
    backbone: BackboneInfo = _key((dict,), section=BackboneInfo)
    graph: GraphEntry = _key((dict,), section=GraphEntry)
    prompt: PromptInfo = _key((dict,), section=PromptInfo)
    tasks: tuple[str, ...] = _key((list,), (), items=str)
    files: dict = _key((dict,))
    parity: dict = _key((dict,), dict)
    options: dict = _key((dict,), dict)
    versions: dict = _key((dict,), dict)
    extra: dict = field(default_factory=dict, repr=False)
    order: tuple | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: object, where: str, name: str = "") -> "Manifest":
        """Check `data` (the parsed manifest.json at `where`): format version first, then every key the runtime
        uses, the graph kind and files, and that every needed file is listed. BundleError names what is wrong."""
        _check_version(data, where)
        manifest = super().from_json(data, where, name)
        manifest._check_files(where)
        return manifest

    def _check_files(self, where: str) -> None:
        graph = self.graph
        if GRAPH_FILES.get(graph.kind) != graph.file or (
                graph.kind == fmt.SEQ2SEQ_KIND and graph.decoder_file != fmt.DECODER_GRAPH):
            raise BundleError(f"{where}: graph {graph.file!r} of kind {graph.kind!r} is not one this runtime serves "
                              f"({', '.join(f'{k}: {v}' for k, v in GRAPH_FILES.items())}, seq2seq with "
                              f"{fmt.DECODER_GRAPH}); re-export the bundle")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.files.items()):
            raise BundleError(f"{where}: files must map file names to sha256 hex digests; {_REEXPORT}")
        for required in (*graph.files, fmt.TOKENIZER, fmt.PROMPTS, fmt.TASKS):
            if required not in self.files:
                raise BundleError(f"{where} lists no {required}; the bundle is incomplete, re-export it")


def _check_version(data: object, where: str) -> None:
    """The version is checked before anything else: a newer bundle may look different in every other key."""
    if not isinstance(data, dict):
        raise BundleError(f"{where} is not a JSON object but {type(data).__name__}; {_REEXPORT}")
    if "format_version" not in data:
        raise BundleError(f"{where} has no format_version: it was not written by `mpt-edge export` or is damaged; "
                          f"{_REEXPORT}")
    version = data["format_version"]
    readable = ", ".join(map(str, fmt.READABLE_VERSIONS))
    if isinstance(version, int) and not isinstance(version, bool) and version > fmt.FORMAT_VERSION:
        from mpt_edge_runtime import __version__
        raise BundleError(f"{where}: format_version {version!r} is not supported: the bundle was written by a newer "
                          f"mpt-edge, and this runtime (mpt_edge_runtime {__version__}) reads versions {readable}; "
                          "upgrade mpt-edge-runtime (it ships in the mpt-edge package: pip install -U 'mpt-edge[cpu]') "
                          "or re-export the bundle with this version")
    if version not in fmt.READABLE_VERSIONS or isinstance(version, bool):
        raise BundleError(f"{where}: format_version {version!r} is not supported (this runtime reads {readable}); "
                          "upgrade mpt-edge-runtime or re-export the bundle with this version")
