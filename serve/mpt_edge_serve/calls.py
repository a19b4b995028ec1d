"""Requests as the gateway checks them and the worker runs them: JSON bodies → ClassifyCall / GenerateCall."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mpt_edge_runtime.errors import InputError
from mpt_edge_runtime.sampling import SamplingParams
from mpt_edge_serve.errors import ApiError

CLASSIFY_FIELDS = {"task", "texts", "bundle"}
SAMPLING_FIELDS = {"max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"}
GENERATE_FIELDS = CLASSIFY_FIELDS | SAMPLING_FIELDS | {"stream"}


@dataclass(frozen=True)
class ClassifyCall:
    bundle: str
    task: str
    texts: tuple[str, ...]


@dataclass(frozen=True)
class GenerateCall:
    bundle: str
    task: str
    texts: tuple[str, ...]
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def sampling(self) -> SamplingParams:
        fields = asdict(self)
        return SamplingParams(**{name: fields[name] for name in SAMPLING_FIELDS})

    def group(self, index: int) -> tuple:
        """Calls with equal groups run as one batch: same sampling options; greedy ignores the seed, and a
        seeded sampled call runs alone so that its text is the one the runtime gives for the same seed."""
        seed = None if self.temperature == 0 else (("alone", index) if self.seed is not None else None)
        return (self.max_new_tokens, float(self.temperature), self.top_k, float(self.top_p), self.stop, seed)


def _object(body: object, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise ApiError(422, f"the body must be a JSON object with {', '.join(sorted(allowed))}, got "
                            f"{type(body).__name__}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(422, f"unknown field(s) {unknown}; allowed: {', '.join(sorted(allowed))}")
    return body


def _common(body: dict, max_texts: int) -> tuple[str, tuple[str, ...], str | None]:
    task, texts, bundle = body.get("task"), body.get("texts"), body.get("bundle")
    if not isinstance(task, str) or not task:
        raise ApiError(422, f"\"task\" must be a task name (string), got {task!r}; GET /v1/tasks lists them")
    if bundle is not None and not isinstance(bundle, str):
        raise ApiError(422, f"\"bundle\" must be a string, got {type(bundle).__name__}")
    if isinstance(texts, str):
        raise ApiError(422, "\"texts\" must be a list of strings; wrap one text in a list")
    if not isinstance(texts, list) or not texts:
        raise ApiError(422, f"\"texts\" must be a non-empty list of strings, got {type(texts).__name__}")
    if len(texts) > max_texts:
        raise ApiError(422, f"{len(texts)} texts in one request; at most {max_texts}: split the request")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ApiError(422, f"texts[{i}] must be a string, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ApiError(422, f"texts[{i}] holds a lone surrogate at character {err.start}, which is not "
                                    "valid Unicode; send valid UTF-8") from None
    return task, tuple(texts), bundle


def parse_classify(body: object, max_texts: int) -> tuple[str, tuple[str, ...], str | None]:
    """(task, texts, bundle or None) of a POST /v1/classify body."""
    return _common(_object(body, CLASSIFY_FIELDS), max_texts)


def parse_generate(body: object, max_texts: int, max_new_tokens: int) -> tuple[str, tuple[str, ...], str | None,
                                                                             dict, bool]:
    """(task, texts, bundle or None, sampling options, stream) of a POST /v1/generate body."""
    body = _object(body, GENERATE_FIELDS)
    task, texts, bundle = _common(body, max_texts)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(422, f"\"stream\" must be true or false, got {stream!r}")
    options = {name: body[name] for name in SAMPLING_FIELDS if name in body}
    for name in ("max_new_tokens", "top_k", "seed"):
        if isinstance(options.get(name), (bool, float)):
            raise ApiError(422, f"\"{name}\" must be an integer, got {options[name]!r}")
    for name in ("temperature", "top_p"):
        if isinstance(options.get(name), bool):
            raise ApiError(422, f"\"{name}\" must be a number, got {options[name]!r}")
    seed = options.get("seed")
    if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2 ** 63):
        raise ApiError(422, f"\"seed\" must be an integer in [0, 2^63) or null, got {seed!r}")
    if "stop" in options and isinstance(options["stop"], list):
        options["stop"] = tuple(options["stop"])
    try:
        config = SamplingParams(**options)
    except InputError as err:
        raise ApiError(422, str(err)) from None
    if config.max_new_tokens > max_new_tokens:
        raise ApiError(422, f"max_new_tokens {config.max_new_tokens} is above this server's limit of {max_new_tokens}")
    sampling = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_k": config.top_k,
                "top_p": config.top_p, "seed": config.seed, "stop": config.stop}
    return task, texts, bundle, sampling, stream
