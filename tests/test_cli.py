"""The command line end to end on a tiny local backbone folder and synthetic task folders."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from conftest import VOCAB, make_tokenizer, synthetic_rows
from mpt_edge.cli import app
from mpt_edge.tasks import write_task

runner = CliRunner()
FAST = ["--steps", "3", "--prompt-length", "4", "--max-length", "32", "--batch-size", "4", "--quiet"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def common(ws):
    return ["--backbone", ws / "tiny-llama", "--data", ws / "data"]


def test_full_pipeline_from_the_command_line(workspace):
    ws, out = workspace, workspace / "runs"
    result = invoke("train", "teachers", "--tasks", "polarity,topic", "--out", out / "t", *common(ws), *FAST)
    assert result.exit_code == 0, result.output
    assert "teachers: 6 steps" in result.output
    result = invoke("train", "source", "--teachers", out / "t", "--out", out / "s", "--rank", "2", *common(ws),
                    "--steps", "3", "--max-length", "32", "--quiet")
    assert result.exit_code == 0, result.output
    for method, extra in [("mpt", ["--source", out / "s", "--mode", "factors"]), ("pt", []),
                          ("spot", ["--source", out / "t", "--spot-task", "polarity"])]:
        result = invoke("train", "target", "--tasks", "mood", "--method", method, "--out", out / method, *extra,
                        *common(ws), *FAST)
        assert result.exit_code == 0, f"{method}: {result.output}"
    recorded = json.loads((out / "mpt" / "checkpoint.json").read_text())
    assert recorded["train"]["lr_factors"] == 0.05 and recorded["prompt"]["rank"] == 2   # factors mode's defaults
    assert json.loads((out / "pt" / "checkpoint.json").read_text())["train"]["lr_factors"] == 0.015
    result = invoke("eval", out / "mpt", "--split", "test", "--json", *common(ws), "--max-length", "32")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)["mood"]
    assert 0 <= scores["accuracy"] <= 1 and scores["n"] == 24
    result = invoke("eval", "--zero-shot", "--tasks", "mood", *common(ws))
    assert result.exit_code == 0 and "mood" in result.output
    result = invoke("eval", out / "mpt", "--tasks", "topic", *common(ws))
    assert result.exit_code == 1 and "error: unknown task 'topic'; known tasks: mood" in result.output

    result = invoke("export", out / "mpt", "--out", out / "bundle", "--backbone", ws / "tiny-llama")
    assert result.exit_code == 0, result.output
    assert "1 task(s)" in result.output and "parity max abs diff" in result.output
    result = invoke("run", out / "bundle", "--task", "mood", "happy film", "sad plot", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] in ("negative", "positive") and lines[1].endswith("sad plot")
    requests = ws / "requests.jsonl"
    requests.write_text('{"task": "mood", "text": "joyful"}\n{"text": "gloomy"}\n')
    result = invoke("run", out / "bundle", "--jsonl", requests, "--task", "mood")
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert result.exit_code == 0 and [r["text"] for r in rows] == ["joyful", "gloomy"]
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    result = invoke("run", out / "bundle", "--task", "nope", "x")
    assert result.exit_code == 1 and "unknown task 'nope'" in result.output
    result = invoke("inspect", out / "bundle")
    assert result.exit_code == 0 and "mood" in result.stdout and "parity fp32" in result.stdout
    result = invoke("export", out / "mpt", "--out", out / "bundle", "--backbone", ws / "tiny-llama")
    assert result.exit_code == 1 and "--overwrite" in result.output


def test_quantized_export_reports_its_dev_accuracy_from_the_command_line(workspace, tmp_path):
    result = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt",
                    *common(workspace), *FAST)
    assert result.exit_code == 0, result.output
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "bundle", "--quantize", "int8-block",
                    *common(workspace), "--eval-limit", "16")
    assert result.exit_code == 0, result.output
    assert "int8-block vs PyTorch: max abs diff" in result.output and "mood: dev accuracy fp32" in result.output
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["graph"]["quantize"]["recipe"] == "int8-block" and manifest["graph"]["quantize"]["quantized"] > 0
    assert set(manifest["quantization_dev_accuracy"]["mood"]) == {"fp32", "quantized", "n"}
    result = invoke("inspect", tmp_path / "bundle")
    assert result.exit_code == 0 and "parity quantized" in result.stdout
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "smooth", "--quantize", "int8-smooth",
                    *common(workspace), "--eval-limit", "16")   # calibrated on the task's train split
    assert result.exit_code == 0, result.output
    smooth = json.loads((tmp_path / "smooth" / "manifest.json").read_text())["graph"]["quantize"]
    assert smooth["recipe"] == "int8-smooth" and smooth["smoothed_inputs"] > 0 and smooth["calibration_feeds"] > 0
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "other", "--quantize", "int3", *common(workspace))
    assert result.exit_code == 1 and "--quantize 'int3' is not one of int8, " in result.output
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "other", "--factors-dtype", "int8", *common(workspace))
    assert result.exit_code == 1 and "--factors-dtype 'int8' is not one of fp32, fp16" in result.output


def test_export_suggests_the_kv_cache_graph_for_a_long_prompt(workspace, tmp_path, monkeypatch):
    import mpt_edge.cli.bundle as bundle_cli

    result = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt",
                    *common(workspace), *FAST)
    assert result.exit_code == 0, result.output
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "short", *common(workspace))
    assert result.exit_code == 0 and "hint:" not in result.output   # 4 prompt positions: nothing to suggest
    monkeypatch.setattr(bundle_cli, "LONG_PROMPT", 4)
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "long", *common(workspace))
    assert result.exit_code == 0 and "hint: the features graph runs the 4 prompt positions in every row" in result.output
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "kv", "--kv-cache", *common(workspace))
    assert result.exit_code == 0 and "hint:" not in result.output and "with KV cache" in result.output


def test_early_stopping_on_dev_from_the_command_line(workspace, tmp_path):
    result = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt", "--eval-every", "2",
                    *common(workspace), *FAST)
    assert result.exit_code == 0, result.output
    assert "dev accuracy by step (0: " in result.output and ", 2: " in result.output and ", 3: " in result.output
    kept = json.loads((tmp_path / "pt" / "checkpoint.json").read_text())["best"]
    assert kept["step"] in (0, 2, 3) and f"kept step {kept['step']}" in result.output


def test_config_file_supplies_options(workspace, tmp_path):
    cfg = tmp_path / "pt.toml"
    cfg.write_text('tasks = ["polarity"]\nsteps = 2\nprompt-length = 3\nmax_length = 32\nquiet = true\n')
    result = invoke("train", "target", "--method", "pt", "--config", cfg, "--out", tmp_path / "pt", *common(workspace))
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "pt" / "checkpoint.json").read_text())
    assert index["step"] == 2 and index["prompt"]["length"] == 3
    cfg.write_text("stepz = 2\n")
    result = invoke("train", "target", "--method", "pt", "--config", cfg, "--tasks", "polarity", "--out", tmp_path / "x")
    assert result.exit_code != 0 and "unknown option(s) ['stepz']" in result.output


@pytest.mark.parametrize("args, message", [
    (["train", "target", "--method", "pt", "--tasks", "nosuch"], "error: task 'nosuch' not found"),
    (["train", "target", "--method", "mpt", "--tasks", "mood"], "error: --method mpt needs --source"),
    (["train", "target", "--method", "pt", "--tasks", "mood", "--steps", "0"], "steps must be an integer >= 1"),
    (["train", "target", "--method", "pt", "--tasks", "mood", "--precision", "fp16"], "precision must be one of fp32"),
    (["eval", "--tasks", "mood"], "give a CHECKPOINT folder, or --zero-shot"),
])
def test_bad_input_is_one_clear_line_and_nonzero_exit(workspace, tmp_path, args, message):
    result = invoke(*args, "--out", tmp_path / "o", *common(workspace)) if args[0] == "train" else \
        invoke(*args, *common(workspace))
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_existing_checkpoint_is_not_overwritten_and_other_backbone_is_refused(workspace, tmp_path):
    ws = workspace
    first = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt", *common(ws), *FAST)
    assert first.exit_code == 0, first.output
    saved = {p.name: p.read_bytes() for p in (tmp_path / "pt").iterdir()}
    again = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt", *common(ws), *FAST)
    assert again.exit_code == 1 and "--resume" in again.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "pt").iterdir()} == saved

    narrow = tmp_path / "narrow-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(narrow)
    make_tokenizer(bert=False).save(str(narrow / "tokenizer.json"))
    result = invoke("eval", tmp_path / "pt", "--backbone", narrow, "--data", ws / "data")
    assert result.exit_code == 1 and "hidden size 32" in result.output and "hidden size 16" in result.output
    assert {p.name: p.read_bytes() for p in (tmp_path / "pt").iterdir()} == saved


def test_every_command_has_help_with_an_example():
    for command in (["train", "teachers"], ["train", "source"], ["train", "target"], ["eval"], ["data", "fetch"],
                    ["quickstart"], ["export"], ["run"], ["inspect"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and "Example: mpt-edge" in result.output, command


def test_cli_defaults_match_the_config_dataclasses():
    """The CLI spells out defaults (so --help is fast, without torch); they must equal the dataclasses'."""
    import typer.main

    from mpt_edge.losses import DistillConfig
    from mpt_edge.training_loop import SOURCE_LR_FACTORS, TrainConfig

    defaults = {**TrainConfig().__dict__, "distill_weight": DistillConfig().weight,
                "temperature": DistillConfig().temperature}
    group = typer.main.get_command(app)
    for path in (["train", "teachers"], ["train", "source"], ["train", "target"]):
        command = group.commands[path[0]].commands[path[1]]
        for param in command.params:
            if param.name in defaults and param.name != "steps":
                # the source stage spells out the paper's factor rate; the target leaves it to --mode (None)
                expected = SOURCE_LR_FACTORS if (path[1], param.name) == ("source", "lr_factors") else defaults[param.name]
                assert param.default == expected, f"{' '.join(path)} --{param.name}"


def test_run_and_inspect_do_not_import_torch(workspace):
    """Serving from the command line needs only the runtime."""
    import subprocess
    import sys

    bundle = workspace / "runs" / "bundle"
    if not bundle.is_dir():
        pytest.skip("needs the bundle of test_full_pipeline_from_the_command_line")
    code = ("import sys; from typer.testing import CliRunner; from mpt_edge.cli import app; "
            f"r = CliRunner().invoke(app, ['run', {str(bundle)!r}, '--task', 'mood', 'happy']); "
            "assert r.exit_code == 0, r.output; "
            f"r = CliRunner().invoke(app, ['inspect', {str(bundle)!r}]); assert r.exit_code == 0, r.output; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_generate_task_trains_exports_and_streams_from_the_command_line(workspace, tmp_path):
    from mpt_edge.tasks import TaskSpec

    spec = TaskSpec("naming", (), kind="generate", template="Review : {text} Mood :")
    answers = {"negative": "sad", "positive": "happy"}
    write_task(workspace / "data" / "naming", spec, {
        split: [{"text": r["text"], "target": answers[r["label"]]} for r in synthetic_rows("polarity", 24, seed)]
        for seed, split in enumerate(["train", "dev", "test"])})
    result = invoke("train", "target", "--method", "pt", "--tasks", "naming,mood", "--out", tmp_path / "pt",
                    *common(workspace), *FAST)
    assert result.exit_code == 0, result.output
    result = invoke("eval", tmp_path / "pt", *common(workspace), "--max-length", "32")
    assert result.exit_code == 0 and "exact match, token accuracy" in result.output, result.output
    assert any(line.startswith("naming") for line in result.stdout.splitlines())
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "bundle", "--backbone", workspace / "tiny-llama")
    assert result.exit_code == 0 and "generation graph with KV cache decoder.onnx" in result.output, result.output
    result = invoke("run", tmp_path / "bundle", "--task", "naming", "good film", "dull plot", "--max-new-tokens", "3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(len(line.split()) <= 3 for line in lines)
    requests = tmp_path / "mixed.jsonl"
    requests.write_text('{"task": "naming", "text": "good film"}\n{"task": "mood", "text": "sad plot"}\n')
    result = invoke("run", tmp_path / "bundle", "--jsonl", requests, "--max-new-tokens", "3")
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert result.exit_code == 0 and rows[0]["generation"] == lines[0] and rows[1]["label"] in ("negative", "positive")
    result = invoke("run", tmp_path / "bundle", "--task", "naming", "x", "--max-new-tokens", "0")
    assert result.exit_code == 1 and "max_new_tokens must be an integer >= 1" in result.output
    result = invoke("inspect", tmp_path / "bundle")
    assert result.exit_code == 0 and "generate" in result.stdout and "generation graph with KV cache" in result.stdout


def test_backbone_defaults_to_the_checkpoints_and_another_one_is_refused(workspace, tmp_path, monkeypatch):
    """Commands that read a checkpoint load the backbone it records when --backbone is not given."""
    import dataclasses

    from mpt_edge import backbones

    ws = workspace
    result = invoke("train", "target", "--method", "pt", "--tasks", "mood", "--out", tmp_path / "pt", *common(ws), *FAST)
    assert result.exit_code == 0, result.output
    # A local folder is recorded by name only: without --backbone the command says what to pass.
    result = invoke("eval", tmp_path / "pt", "--data", ws / "data", "--max-length", "32")
    assert result.exit_code == 1 and "trained on backbone 'tiny-llama'" in result.output, result.output
    assert "pass --backbone FOLDER" in result.output and "Traceback" not in result.output

    # As a named backbone (like smollm2-135m) the recorded name is enough.
    named = dict(backbones.NAMED_BACKBONES)
    named["tiny-llama"] = dataclasses.replace(named["minilm-l6"], name="tiny-llama")
    monkeypatch.setattr(backbones, "NAMED_BACKBONES", named)
    monkeypatch.setattr(backbones, "_cached_folder", lambda spec, cache: ws / "tiny-llama")
    result = invoke("eval", tmp_path / "pt", "--data", ws / "data", "--max-length", "32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["mood"]["n"] == 24
    result = invoke("export", tmp_path / "pt", "--out", tmp_path / "bundle")
    assert result.exit_code == 0 and "1 task(s)" in result.output, result.output
    result = invoke("train", "target", "--method", "spot", "--source", tmp_path / "pt", "--spot-task", "mood",
                    "--tasks", "polarity", "--out", tmp_path / "spot", "--data", ws / "data", *FAST)
    assert result.exit_code == 0, result.output

    # An explicit --backbone that does not fit the checkpoint is still an error.
    narrow = tmp_path / "narrow-llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(narrow)
    make_tokenizer(bert=False).save(str(narrow / "tokenizer.json"))
    for args in (["export", tmp_path / "pt", "--out", tmp_path / "b2"],
                 ["train", "target", "--method", "spot", "--source", tmp_path / "pt", "--spot-task", "mood",
                  "--tasks", "polarity", "--out", tmp_path / "spot2", "--data", ws / "data", *FAST]):
        result = invoke(*args, "--backbone", narrow)
        assert result.exit_code == 1 and "hidden size 16" in result.output and "pass --backbone tiny-llama" in result.output
        assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert not (tmp_path / "b2").exists() and not (tmp_path / "spot2").exists()


@pytest.mark.parametrize("raised, one_line", [
    ("ValueError('a bug, not bad input')", False),               # not a project error: the traceback stays
    ("KeyError('internal')", False),
    ("ConfigError('bad option --x; allowed: a, b')", True),      # project errors: one line, exit code 1
    ("mer.InputError('bad request')", True),
])
def test_only_project_errors_are_one_line(tmp_path, raised, one_line):
    """The CLI shows a project error (MptEdgeError, the runtime's MptEdgeRuntimeError) as one `error:` line and
    any other exception with its traceback (a bug must not look like bad input)."""
    import subprocess
    import sys

    code = ("import sys, mpt_edge_runtime as mer, mpt_edge_runtime.bundle as bundle\n"
            "from mpt_edge.errors import ConfigError\n"
            f"def read_manifest(folder): raise {raised}\n"
            "bundle.read_manifest = read_manifest\n"
            "from mpt_edge.cli import app\n"
            "app(['inspect', sys.argv[1]])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    if one_line:
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    else:
        assert "Traceback (most recent call last)" in proc.stderr and "error: " not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith(raised.split("(")[0] + ": "), proc.stderr


def test_project_errors_share_one_base():
    """Every user-facing error type is an MptEdgeError (or the runtime's MptEdgeRuntimeError); UnknownTaskError is
    one class on both sides; the old ValueError / RuntimeError bases are kept for callers that catch those."""
    import mpt_edge_runtime as mer
    from mpt_edge import errors
    from mpt_edge.atomic import OutputError
    from mpt_edge.checkpoint import CheckpointError
    from mpt_edge.data.fetch import DataSourceError
    from mpt_edge.recipe import RecipeError
    from mpt_edge.tasks import TaskError, UnknownTaskError
    from mpt_edge_export.bundle_writer import ExportError
    from mpt_edge_export.families import UnsupportedBackboneError
    from mpt_edge_runtime.text import TextError

    assert UnknownTaskError is mer.UnknownTaskError is errors.UnknownTaskError
    for cls in (OutputError, CheckpointError, DataSourceError, RecipeError, TaskError, ExportError,
                UnsupportedBackboneError, errors.ConfigError):
        assert issubclass(cls, errors.MptEdgeError) and issubclass(cls, ValueError), cls
    for cls in (errors.BackboneError, errors.PackageFetchError, errors.StoreError):
        assert issubclass(cls, errors.MptEdgeError) and issubclass(cls, RuntimeError), cls
    assert issubclass(TextError, mer.MptEdgeRuntimeError) and issubclass(TextError, ValueError)
    assert errors.USER_ERRORS == (errors.MptEdgeError, mer.MptEdgeRuntimeError)
    assert str(UnknownTaskError("x", ["b", "a"], listing="known tasks")) == "unknown task 'x'; known tasks: a, b"
