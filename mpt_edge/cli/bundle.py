"""`mpt-edge export`, `run` and `inspect`: from a checkpoint to a bundle, and serving it.

`run` and `inspect` use only the torch-free runtime (this module imports no torch).
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from mpt_edge.atomic import check_writable
from mpt_edge.cli.common import checkpoint_backbone, cli_errors, data_dir
from mpt_edge.cli.options import CheckpointBackbone, Config, DataDir, Device

LONG_PROMPT = 50   # prompt positions from which export suggests --kv-cache for a classify-only causal bundle

bundle_app = typer.Typer()


@bundle_app.command("export")
@cli_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint folder of `mpt-edge train`.")],
    out: Annotated[Path, typer.Option(help="Bundle folder to write.")],
    config: Config = None, backbone: CheckpointBackbone = None,
    optimize: Annotated[bool, typer.Option(help="onnxruntime graph optimizations, saved in the graph.")] = False,
    quantize: Annotated[Optional[str], typer.Option(help="For CPU: int4, int4-fp32, int8-block (weight-only MatMulNBits), int8, int8-per-channel, int8-mixed, int8-mixed-per-channel (dynamic; the last is the recommendation with --kv-cache on a VNNI/AMX CPU) or int8-smooth (SmoothQuant, calibrated on the tasks' train split); see docs/performance.md#quantization.")] = None,
    dtype: Annotated[str, typer.Option(help="fp32, or fp16 (for CUDA).")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 17,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing bundle folder.")] = False,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="onnxruntime's fused ops, parity checked (else the traced graph): encoder attention; for Llama-like backbones the fused generation graph (GroupQueryAttention, onnxruntime >= 1.32 to run it).")] = True,
    kv_cache: Annotated[Optional[bool], typer.Option("--kv-cache/--no-kv-cache", help="Causal and seq2seq: export the generation graph(s) with KV cache instead of the features graph; they serve classify too. Default: when a task generates or scores whole verbalizer sequences.")] = None,
    data: DataDir = None,
    eval_limit: Annotated[int, typer.Option(help="With --quantize: dev examples per task to compare the quantized bundle with fp32 (0: skip).")] = 200,
    factors_dtype: Annotated[str, typer.Option(help="Each task's U, V as stored: fp32, or fp16 (half the bytes a task; the runtime composes the prompt in fp32).")] = "fp32",
):
    """Export a checkpoint to a bundle: backbone graph (prompt as input), tokenizer, factors, tasks, manifest.

    Example: mpt-edge export runs/mpt --out bundles/mpt --quantize int8-mixed
    """
    check_writable(out.parent, keep=False)   # the bundle is built in a temp folder beside --out
    from mpt_edge.backbones import load_backbone
    from mpt_edge.bundle_source import bundle_source, calibration_rows
    from mpt_edge.trained import load_trained
    from mpt_edge_export.bundle_writer import ExportOptions, write_bundle
    from mpt_edge_export.transform import CALIBRATED
    from mpt_edge_runtime import format as fmt

    trained = load_trained(checkpoint)
    options = ExportOptions(fuse=fuse, optimize=optimize, quantize=quantize, dtype=dtype, opset=opset, overwrite=overwrite,
                            max_length=trained.meta.max_length, kv_cache=kv_cache, factors_dtype=factors_dtype)
    bb = load_backbone(checkpoint_backbone(trained, checkpoint, backbone))
    trained.check_backbone(bb, checkpoint)
    source = bundle_source(trained, bb)
    if quantize in CALIBRATED:
        source = replace(source, calibration=calibration_rows(trained, bb, data_dir(data)))
    manifest = write_bundle(source, out, options, log=lambda msg: typer.echo(msg, err=True))
    parity = manifest["parity"]
    graph = manifest["graph"]
    kind = {fmt.DECODER_KIND: "generation graph with KV cache",
            fmt.FUSED_DECODER_KIND: "fused generation graph with KV cache (GroupQueryAttention)", fmt.SEQ2SEQ_KIND: "encoder + step-0 graph (with the "
            "KV-cache step graph decoder.onnx)"}.get(graph.get("kind"), "features graph")   # graph kinds, not families
    typer.echo(f"bundle → {out}: {len(manifest['tasks'])} task(s), {kind} {graph['file']} "
               f"{manifest['files'][graph['file']][:12]}…, fp32 parity max abs diff {parity['fp32']['max_abs_diff']:.2e} "
               f"over {len(parity['fp32']['cases'])} shapes")
    if kv_cache is None and bb.family.generates and graph.get("kind") == fmt.FEATURES_KIND \
            and manifest["prompt"]["length"] >= LONG_PROMPT:
        typer.echo(f"hint: the features graph runs the {manifest['prompt']['length']} prompt positions in every row; "
                   "--kv-cache computes each task's prompt KV once (SmolLM2, l = 100: 2-3x faster classify; "
                   "docs/runtime.md)", err=True)
    if quantize:
        quantized = parity["quantized"]
        typer.echo(f"{quantize} vs PyTorch: max abs diff {quantized['max_abs_diff']:.3g}"
                   + (f", features min cosine {quantized['min_cosine']:.4f}" if "min_cosine" in quantized else ""))
        if eval_limit > 0:
            _compare_quantized(bb, trained, out, manifest, data_dir(data), eval_limit)


def _compare_quantized(backbone, trained, bundle: Path, manifest: dict, data: Path, limit: int) -> None:
    """Dev accuracy of the quantized bundle vs the fp32 PyTorch model; recorded in the manifest (not hashed)."""
    import mpt_edge_runtime as mer
    from mpt_edge.atomic import write_text_atomic
    from mpt_edge.datasets import load_split
    from mpt_edge.evaluate import evaluate_engine, evaluate_trained
    from mpt_edge.tasks import TaskError

    names = [s.name for s in trained.specs if s.kind == "classify"]
    if not names:
        return
    try:
        dev = load_split(names, data, "dev", limit=limit)
    except TaskError as err:
        typer.echo(f"note: no dev split to compare the quantized bundle with fp32 ({err})", err=True)
        return
    fp32 = evaluate_trained(backbone, trained, dev, max_length=trained.meta.max_length)
    engine = mer.load(bundle, device="cpu")
    report = {}
    for task in dev:
        accuracy = evaluate_engine(engine, task)[0]["accuracy"]
        report[task.spec.name] = {"fp32": fp32[task.spec.name]["accuracy"], "quantized": accuracy, "n": len(task)}
        typer.echo(f"{task.spec.name}: dev accuracy fp32 {report[task.spec.name]['fp32']:.4f} → quantized {accuracy:.4f} "
                   f"({100 * (accuracy - report[task.spec.name]['fp32']):+.1f} points, {len(task)} examples)")
    manifest["quantization_dev_accuracy"] = report
    write_text_atomic(bundle / "manifest.json", json.dumps(manifest, indent=2) + "\n")


@bundle_app.command("run")
@cli_errors
def run_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts for --task.")] = None,
    task: Annotated[str, typer.Option(help="Task for the texts (or the default for JSONL rows without one).")] = "",
    jsonl: Annotated[Optional[str], typer.Option(help="JSONL input file, or - for stdin: {\"task\", \"text\"} per line.")] = None,
    device: Device = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: onnxruntime's).")] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per forward.")] = 32,
    max_new_tokens: Annotated[int, typer.Option(help="Generate tasks: tokens to generate at most.")] = 64,
    temperature: Annotated[float, typer.Option(help="Generate tasks: 0 = greedy, > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Generate tasks: sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Generate tasks: nucleus sampling mass (1 = all).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Generate tasks: sampling seed.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="Generate tasks: stop at this string (repeatable).")] = None,
):
    """Classify or generate with a bundle (no torch). Plain texts print one line each (generated text streams
    as it is produced); JSONL in gives JSONL out.

    Example: mpt-edge run bundles/mpt --task rotten_tomatoes "a gorgeous, moving film" "two hours I want back"
    """
    import mpt_edge_runtime as mer

    if bool(texts) == bool(jsonl):
        raise mer.InputError("give texts (with --task) or --jsonl FILE|-, not both and not neither")
    engine = mer.load(bundle, device=device, threads=threads, batch_size=batch_size)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                "seed": seed, "stop": tuple(stop or ())}
    if texts:
        if not task:
            raise mer.InputError(f"--task is required with plain texts; tasks: {', '.join(engine.tasks)}")
        if engine.task(task).kind == "generate":
            for text in texts:
                for piece in engine.stream(task, text, mer.SamplingParams(**sampling)):
                    typer.echo(piece, nl=False)
                    sys.stdout.flush()
                typer.echo("")
            return
        for text, p in zip(texts, engine.classify(task, texts)):
            typer.echo(f"{p.label}\t{p.score:.4f}\t{text}")
        return
    requests = _read_jsonl(jsonl, task)
    generating = [i for i, (name, _) in enumerate(requests) if engine.task(name).kind == "generate"]
    classifying = [i for i in range(len(requests)) if i not in set(generating)]
    rows: dict[int, dict] = {}
    if classifying:
        for i, p in zip(classifying, engine.run([requests[i] for i in classifying])):
            rows[i] = {"label": p.label, "score": p.score, "probabilities": p.probabilities}
    if generating:
        for i, text in zip(generating, engine.generate_batch([requests[i] for i in generating],
                                                             mer.SamplingParams(**sampling))):
            rows[i] = {"generation": text}
    for i, (name, text) in enumerate(requests):
        typer.echo(json.dumps({"task": name, "text": text, **rows[i]}, ensure_ascii=False))


def _read_jsonl(source: str, default_task: str) -> list[tuple[str, str]]:
    import mpt_edge_runtime as mer

    try:
        lines = sys.stdin.read().splitlines() if source == "-" else Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise mer.InputError(f"cannot read --jsonl {source}: {err}") from None
    requests = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise mer.InputError(f"{source}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise mer.InputError(f"{source}:{number}: expected an object with a string \"text\"")
        name = row.get("task", default_task)
        if not name:
            raise mer.InputError(f"{source}:{number}: no \"task\" and no --task default")
        requests.append((name, row["text"]))
    if not requests:
        raise mer.InputError(f"{source}: no requests")
    return requests


@bundle_app.command("inspect")
@cli_errors
def inspect_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
):
    """Tasks, shapes, sizes per task, parity report and versions of a bundle (hashes verified).

    Example: mpt-edge inspect bundles/mpt
    """
    from safetensors.numpy import load as load_tensors

    from mpt_edge_runtime import format as fmt
    from mpt_edge_runtime.bundle import read_manifest, task_tensors

    manifest = read_manifest(bundle)
    if as_json:
        typer.echo(json.dumps(manifest.to_json(), indent=2))
        return
    tensors = load_tensors((bundle / fmt.PROMPTS).read_bytes())
    tasks = json.loads((bundle / fmt.TASKS).read_text())["tasks"]
    b, g, p = manifest.backbone, manifest.graph, manifest.prompt
    typer.echo(f"bundle {bundle} (format {manifest.format_version}), family {manifest.family}, backbone "
               f"{b.name} ({b.model_type}, d={b.hidden_size}, {b.num_layers} layers)")
    typer.echo(f"graph: opset {g.opset}, {g.dtype}" + (f", {g.quantize['recipe']}" if g.quantize else "")
               + (", optimized" if g.optimize else "") + f"; prompt l={p.length}, {p.groups} shared group(s)")
    typer.echo("files: " + ", ".join(f"{name} {(bundle / name).stat().st_size / 1e6:.2f} MB" for name in manifest.files))
    if g.kind in (fmt.DECODER_KIND, fmt.FUSED_DECODER_KIND):
        fused = " (fused: GroupQueryAttention)" if g.kind == fmt.FUSED_DECODER_KIND else ""
        typer.echo(f"generation graph with KV cache{fused}: {g.file}, eos ids {list(g.eos_token_ids or ())}")
    elif g.kind == fmt.SEQ2SEQ_KIND:
        typer.echo(f"seq2seq generation graphs: {g.file} (encoder + decoder step 0, cross-attention KV), "
                   f"{g.decoder_file} (one decoder step with KV cache), eos ids {list(g.eos_token_ids or ())}")
    typer.echo(f"{'task':<22} {'kind':>8} {'labels':>6} {'rank':>4} {'group':>5} {'factors+head bytes':>19}")
    for spec in tasks:
        parts = task_tensors(tensors, spec["name"])
        typer.echo(f"{spec['name']:<22} {spec.get('kind', 'classify'):>8} {len(spec['labels']):>6} {parts['u'].shape[1]:>4} {spec['group']:>5} "
                   f"{sum(x.nbytes for x in parts.values()):>19}")
    if fmt.VERBALIZER_IDS in tensors:
        typer.echo(f"verbalizer table: {len(tensors[fmt.VERBALIZER_IDS])} token rows shared by the tasks, "
                   f"{sum(tensors[k].nbytes for k in (fmt.VERBALIZER_IDS, fmt.VERBALIZER_WEIGHT, fmt.VERBALIZER_BIAS))} bytes")
    for name, report in manifest.parity.items():
        cosine = f", min cosine {report['min_cosine']:.5f}" if "min_cosine" in report else ""
        typer.echo(f"parity {name}: max abs diff {report['max_abs_diff']:.2e}{cosine} over {len(report['cases'])} shapes")
    typer.echo("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
