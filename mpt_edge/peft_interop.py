"""PEFT interop: read a PEFT Multitask Prompt Tuning adapter into an mpt-edge checkpoint, and write one back.

PEFT's `MultitaskPromptEmbedding` composes the same prompt as ours,

    P_k = prompt_embeddings ∘ (prefix_task_cols[k] @ prefix_task_rows[k])    (l, d) ∘ ((l, r) @ (r, d)),

so the tensors map one to one: shared P* = `prompt_embeddings` (l, d), U = `prefix_task_cols` (T, l, r),
V = `prefix_task_rows` (T, r, d). PEFT has one shared prompt and no task names, labels or templates: those
come from our task folders on import and travel in `mpt_edge_tasks.json` beside the adapter on export.
Only safetensors and JSON are read (an `adapter_model.bin` is refused: it would need unpickling).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mpt_edge.checkpoint import save_checkpoint
from mpt_edge.errors import PeftInteropError  # noqa: F401  (defined with the other project errors)
from mpt_edge.tasks import TaskSpec
from mpt_edge.training_loop import TrainConfig
from mpt_edge.trained import Trained

PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
CONFIG_FILE, WEIGHTS_FILE, TASKS_FILE = "adapter_config.json", "adapter_model.safetensors", "mpt_edge_tasks.json"
KEYS = ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")


@dataclass(frozen=True)
class PeftPrompt:
    """A PEFT MPT adapter: shared (l, d), cols (T, l, r), rows (T, r, d), its config, and our task specs if known."""

    config: dict
    shared: torch.Tensor
    cols: torch.Tensor
    rows: torch.Tensor
    tasks: list[dict] | None = None     # TaskSpec JSON per task id, from mpt_edge_tasks.json
    max_length: int | None = None

    def __post_init__(self):
        tasks, length, rank = self.cols.shape if self.cols.dim() == 3 else (None, None, None)
        if (self.shared.dim() != 2 or self.cols.dim() != 3 or self.rows.shape != (tasks, rank, self.shared.shape[1])
                or length != self.shared.shape[0]):
            raise PeftInteropError(
                f"PEFT MPT tensors do not fit: prompt_embeddings {tuple(self.shared.shape)}, prefix_task_cols "
                f"{tuple(self.cols.shape)}, prefix_task_rows {tuple(self.rows.shape)}; expected (l, d), (T, l, r), (T, r, d)")
        if self.tasks is not None and len(self.tasks) != tasks:
            raise PeftInteropError(f"{TASKS_FILE} names {len(self.tasks)} tasks but the adapter has {tasks}")


def read_peft_adapter(folder: Path) -> PeftPrompt:
    """Read `adapter_config.json` + `adapter_model.safetensors` (+ our `mpt_edge_tasks.json` if present)."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise PeftInteropError(f"{folder} has no {CONFIG_FILE}; point at the folder written by PEFT's `save_pretrained`")
    if not weights_path.is_file():
        hint = (" (it holds adapter_model.bin, a pickle that mpt-edge never loads; in PEFT, re-save it with "
                "`model.save_pretrained(folder, safe_serialization=True)`)") if (folder / "adapter_model.bin").is_file() else ""
        raise PeftInteropError(f"{folder} has no {WEIGHTS_FILE}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PeftInteropError(f"{config_path}: not valid JSON ({err.msg})") from None
    if config.get("peft_type") != PEFT_TYPE:
        raise PeftInteropError(f"{config_path}: peft_type {config.get('peft_type')!r} is not {PEFT_TYPE!r}; "
                               "only Multitask Prompt Tuning adapters can be imported")
    if config.get("task_type") not in _peft_task_types():
        raise PeftInteropError(f"{config_path}: task_type {config.get('task_type')!r} is not supported; allowed: "
                               f"{', '.join(_peft_task_types())} (PEFT's SEQ_CLS head is one classifier for every task)")
    submodules = config.get("num_transformer_submodules") or (2 if config["task_type"] == "SEQ_2_SEQ_LM" else 1)
    if submodules != 1:
        raise PeftInteropError(
            f"{config_path}: num_transformer_submodules = {submodules} (a prompt on the decoder too); mpt-edge puts the "
            "prompt on the encoder only. Train the PEFT adapter with num_transformer_submodules=1")
    tensors = load_file(str(weights_path))
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise PeftInteropError(f"{weights_path} lacks {missing}; found {sorted(tensors)}")
    extra = json.loads((folder / TASKS_FILE).read_text()) if (folder / TASKS_FILE).is_file() else {}
    return PeftPrompt(config, *(tensors[k].float() for k in KEYS), extra.get("tasks"), extra.get("max_length"))


def write_peft_adapter(prompt: PeftPrompt, out: Path) -> Path:
    """Write `prompt` as a PEFT adapter folder, all at once (a temp sibling renamed into place); never overwrites."""
    out = Path(out)
    if out.exists():
        raise PeftInteropError(f"{out} already exists; choose another --out (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file({k: t.contiguous() for k, t in zip(KEYS, (prompt.shared, prompt.cols, prompt.rows))},
                  str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(prompt.config, indent=2) + "\n")
        if prompt.tasks is not None:
            (tmp / TASKS_FILE).write_text(json.dumps({"tasks": prompt.tasks, "max_length": prompt.max_length}, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _peft_families() -> list[str]:
    from mpt_edge_export.families import FAMILIES

    return [f.name for f in FAMILIES.values() if f.peft_task_type is not None]


def _peft_task_types() -> list[str]:
    from mpt_edge_export.families import FAMILIES

    return [f.peft_task_type for f in FAMILIES.values() if f.peft_task_type is not None]


def peft_prompt_from_trained(trained: Trained, backbone) -> PeftPrompt:
    """Our checkpoint as PEFT MPT tensors + config; needs one shared prompt and no encoder heads."""
    if trained.prompt is None:
        raise PeftInteropError("this checkpoint has no prompt (a head-only baseline); there is nothing to export")
    if trained.heads is not None or backbone.family.peft_task_type is None:
        raise PeftInteropError(f"{backbone.family.name} checkpoints train per-task heads, which PEFT's MPT adapter cannot "
                               f"hold; export-peft supports the {' and '.join(_peft_families())} families")
    tensors = trained.prompt.tensors()
    if tensors["prompt.shared"].shape[0] != 1:
        raise PeftInteropError(
            f"this checkpoint has {tensors['prompt.shared'].shape[0]} shared prompts (stage {trained.meta.stage!r}, "
            f"mode {trained.meta.extra.get('mode')!r}); PEFT's MPT has one. Export a source checkpoint or a target one trained "
            "with --mode factors or group (or a single task)")
    shared, cols, rows = tensors["prompt.shared"][0], tensors["prompt.u"], tensors["prompt.v"]
    model_config = backbone.model.config
    config = {
        "peft_type": PEFT_TYPE, "task_type": backbone.family.peft_task_type, "inference_mode": True,
        "base_model_name_or_path": str(backbone.path) if backbone.path is not None else backbone.name,
        "num_virtual_tokens": shared.shape[0], "token_dim": shared.shape[1], "num_transformer_submodules": 1,
        "num_attention_heads": getattr(model_config, "num_attention_heads", None),
        "num_layers": getattr(model_config, "num_hidden_layers", getattr(model_config, "num_layers", None)),
        "num_tasks": cols.shape[0], "num_ranks": cols.shape[2], "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None, "prompt_tuning_init_state_dict_path": None, "prompt_tuning_init_task": 0,
        "tokenizer_name_or_path": None, "tokenizer_kwargs": None, "modules_to_save": None, "revision": None,
    }
    return PeftPrompt(config, shared, cols, rows, [s.to_json() for s in trained.specs],
                      trained.meta.max_length)


def import_peft(prompt: PeftPrompt, backbone, specs: list[TaskSpec] | None, out: Path, max_length: int | None = None) -> Path:
    """Write `prompt` as an mpt-edge `source` checkpoint in `out` (one shared prompt, group 0 for every task).

    `specs` name the tasks in PEFT's task-id order; None takes them from the adapter's mpt_edge_tasks.json.
    """
    if prompt.config["task_type"] != backbone.family.peft_task_type:
        raise PeftInteropError(f"the adapter is {prompt.config['task_type']} but backbone {backbone.name!r} is "
                               f"{backbone.family.name}; pass the backbone it was trained on with --backbone")
    hidden = backbone.model.get_input_embeddings().embedding_dim
    if prompt.shared.shape[1] != hidden:
        raise PeftInteropError(f"the adapter's token_dim is {prompt.shared.shape[1]} but backbone {backbone.name!r} has "
                               f"hidden size {hidden}; pass the backbone it was trained on with --backbone")
    if specs is None:
        if prompt.tasks is None:
            raise PeftInteropError(f"PEFT adapters do not name their tasks: pass --tasks with {prompt.cols.shape[0]} "
                                   "task names (task folders), in PEFT's task-id order")
        specs = [TaskSpec.from_json(t) for t in prompt.tasks]
    if len(specs) != prompt.cols.shape[0]:
        raise PeftInteropError(f"the adapter has {prompt.cols.shape[0]} tasks (num_tasks) but {len(specs)} were named; "
                               "name one task per PEFT task id, in order")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise PeftInteropError(f"{out} is not empty; choose another --out (nothing was written)")
    tasks, length, rank = prompt.cols.shape
    train = asdict(TrainConfig(steps=1, max_length=max_length or prompt.max_length or TrainConfig.max_length))
    meta = {
        "backbone": {"name": backbone.name, "family": backbone.family.name, "hidden_size": hidden},
        "tasks": [s.to_json() for s in specs],
        "prompt": {"length": length, "rank": rank, "groups": 1, "task_groups": [0] * tasks},
        "heads": False, "pooling": None, "stage": "source", "train": train, "total_steps": 0, "history": [],
        "imported": {"from": "peft", "peft_version": prompt.config.get("peft_version"),
                     "task_type": prompt.config["task_type"]},
    }
    tensors = {"prompt.shared": prompt.shared[None], "prompt.u": prompt.cols, "prompt.v": prompt.rows,
               "prompt.task_groups": torch.zeros(tasks, dtype=torch.long)}
    return save_checkpoint(Path(out), meta, tensors, step=0)
