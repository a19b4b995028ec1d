"""Source recipes: parsing, the two-stage build that resumes, the shipped format and `--source NAME`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mpt_edge import shipped
from mpt_edge.checkpoint import CheckpointError
from mpt_edge.cli import app
from mpt_edge.recipe import RecipeError, read_recipe, recipe_from_dict

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def tiny_recipe(ws, **source) -> str:
    source = {"max_steps": 16, "eval_every": 4, "patience": 3, "gap": 0.5, "lr_prompt": 0.3, **source}
    return "\n".join([
        'name = "tiny"', f'backbone = "{ws / "tiny-llama"}"', 'sources = ["polarity", "topic"]', 'held_out = ["mood"]',
        "prompt_length = 4", "max_length = 32", "k_per_class = 8", "dev_limit = 12",
        "[teachers]", "max_steps = 12", "eval_every = 4", "patience = 2", "lr_prompt = 0.3", "batch_size = 4",
        "[source]", *(f"{k} = {v}" for k, v in source.items()), "batch_size = 4", ""])


def test_recipe_checks_keys_split_and_values(tmp_path):
    ok = {"name": "x", "backbone": "b", "sources": ["a", "b"], "held_out": ["c"]}
    assert recipe_from_dict(ok).sources == ("a", "b")
    for bad, message in [({**ok, "held_out": ["a"]}, "both sources and held-out"),
                         ({**ok, "sources": ["a"]}, "at least 2 source tasks"),
                         ({**ok, "prompt_lenght": 20}, "unknown key"),
                         ({**ok, "teachers": {"eval_every": 0}}, r"\[teachers\]: eval_every must be an integer >= 1"),
                         ({**ok, "source": {"gap": 2}}, "gap must be"),
                         ({**ok, "source": {"select": "median"}}, 'select must be "worst" or "mean"'),
                         ({**ok, "source": {"warmpu": 2}}, r"\[source\]: unknown key")]:
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(bad)
    (tmp_path / "r.toml").write_text("name = ")
    with pytest.raises(RecipeError, match="not valid TOML"):
        read_recipe(tmp_path / "r.toml")


def test_shipped_recipes_parse_and_keep_targets_out_of_the_sources():
    recipes = sorted(shipped.SHIPPED_DIR.glob("*/recipe.toml"))
    assert recipes, "the kit ships at least one recipe"
    for path in recipes:
        recipe = read_recipe(path)
        assert recipe.name == path.parent.name and len(recipe.held_out) >= 3
        assert not set(recipe.sources) & set(recipe.held_out)


def test_recipe_builds_resumes_ships_and_serves_as_source_by_name(workspace, tmp_path, monkeypatch):
    (tmp_path / "tiny.toml").write_text(tiny_recipe(workspace))
    args = ["train", "source", "--recipe", tmp_path / "tiny.toml", "--out", tmp_path / "shipped" / "tiny",
            "--work", tmp_path / "work", "--data", workspace / "data", "--quiet"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "shipped" / "tiny" / "source.json").read_text())
    prov = index["provenance"]
    assert set(prov["teachers"]) == {"polarity", "topic"} and prov["split"]["held_out_targets"] == ["mood"]
    assert set(prov["source"]["gap"]) == {"polarity", "topic"} and prov["wall_seconds"]["total"] > 0
    gaps = prov["source"]["gap"].values()
    assert prov["source"]["select"] == "worst" and prov["source"]["worst_gap"] == pytest.approx(min(gaps), abs=1e-4)
    assert prov["source"]["mean_gap"] == pytest.approx(sum(gaps) / 2, abs=1e-4)
    assert prov["source"]["every_task_within_gap"] == (min(gaps) >= -0.5)
    for name, teacher in prov["teachers"].items():
        assert teacher["steps"] <= 12 and 0 <= teacher["dev_accuracy"] <= 1
    assert "cores" in prov["machine"] and (tmp_path / "shipped" / "tiny" / "recipe.toml").is_file()
    before = (tmp_path / "shipped" / "tiny" / "source.safetensors").read_bytes()

    again = invoke(*args)                                         # everything finished: read back, nothing retrained
    assert again.exit_code == 0, again.output
    assert (tmp_path / "shipped" / "tiny" / "source.safetensors").read_bytes() == before

    source = shipped.load_source(tmp_path / "shipped" / "tiny")
    assert source.task_names == ["polarity", "topic"] and source.prompt.length == 4
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "shipped")
    assert shipped.shipped_names() == ["tiny"]
    torch.testing.assert_close(shipped.resolve_source("tiny").prompt.fold(), source.prompt.fold())
    result = invoke("train", "target", "--tasks", "mood", "--source", "tiny", "--out", tmp_path / "mpt",
                    "--backbone", workspace / "tiny-llama", "--data", workspace / "data", "--steps", "2",
                    "--max-length", "32", "--batch-size", "4", "--quiet")
    assert result.exit_code == 0, result.output


def test_interrupted_source_stage_resumes_to_the_same_prompt(workspace, tmp_path, monkeypatch):
    from mpt_edge import source_build
    from mpt_edge.recipe import read_recipe as read

    (tmp_path / "tiny.toml").write_text(tiny_recipe(workspace, patience=10, gap=0.0))
    recipe = read(tmp_path / "tiny.toml")
    whole = tmp_path / "whole"
    source_build.build_source(recipe, whole, workspace / "data", progress=False)

    real_fit, calls = source_build.fit, {"n": 0}

    def fit_that_dies_in_the_source_stage(plan, *a, **kw):
        if plan.stage == "source":
            inner = plan.loss_fn

            def dies(batch, totals):
                calls["n"] += 1
                if calls["n"] == 6:
                    raise KeyboardInterrupt
                return inner(batch, totals)

            plan.loss_fn = dies
        return real_fit(plan, *a, **kw)

    monkeypatch.setattr(source_build, "fit", fit_that_dies_in_the_source_stage)
    with pytest.raises(KeyboardInterrupt):
        source_build.build_source(recipe, tmp_path / "split", workspace / "data", progress=False)
    monkeypatch.setattr(source_build, "fit", real_fit)
    source_build.build_source(recipe, tmp_path / "split", workspace / "data", progress=False)
    from mpt_edge.trained import load_trained

    torch.testing.assert_close(load_trained(tmp_path / "split" / "source").prompt.fold(),
                               load_trained(whole / "source").prompt.fold(), rtol=0, atol=0)


def test_unknown_or_damaged_sources_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path / "none")
    with pytest.raises(CheckpointError, match="no source 'nope'"):
        shipped.resolve_source("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a source"):
        shipped.resolve_source(tmp_path / "empty")
    (tmp_path / "empty" / "source.json").write_text(json.dumps({"format": shipped.FORMAT, "version": 99}))
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        shipped.resolve_source(tmp_path / "empty")


def test_processes_share_a_build_by_claiming_teachers(workspace, tmp_path):
    """A teacher another process holds is skipped, then waited for; the result equals a one-process build."""
    import threading
    import time

    from mpt_edge import source_build
    from mpt_edge.claim import claimed
    from mpt_edge.recipe import read_recipe as read
    from mpt_edge.trained import load_trained

    (tmp_path / "tiny.toml").write_text(tiny_recipe(workspace))
    recipe = read(tmp_path / "tiny.toml")
    source_build.build_source(recipe, tmp_path / "alone", workspace / "data", progress=False)

    shared, messages = tmp_path / "shared", []
    build = threading.Thread(target=source_build.build_source, args=(recipe, shared, workspace / "data"),
                             kwargs={"progress": False, "log": messages.append})
    with claimed(shared / "teachers" / "polarity.lock") as held:        # "another process" holds polarity
        assert held
        build.start()
        deadline = time.monotonic() + 120
        while "waiting for polarity (another process)" not in messages and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "polarity is being trained by another process; moving on" in messages
        assert "waiting for polarity (another process)" in messages
        assert (shared / "teachers" / "topic" / "checkpoint.json").is_file()
        assert not (shared / "teachers" / "polarity").exists() and build.is_alive()
    build.join(timeout=120)                                             # released: the build trains it and goes on
    assert not build.is_alive()
    for stage in ("teachers/polarity", "teachers/topic", "source"):
        torch.testing.assert_close(load_trained(shared / stage).prompt.fold(),
                                   load_trained(tmp_path / "alone" / stage).prompt.fold(), rtol=0, atol=0)


def test_source_stage_scores_the_worst_or_the_mean_gap():
    from mpt_edge.source_build import gap_score

    accuracy, teachers = {"a": 0.80, "b": 0.50, "c": 0.70}, {"a": 0.75, "b": 0.60, "c": 0.70}
    worst, details = gap_score(accuracy, teachers, "worst")
    mean, _ = gap_score(accuracy, teachers, "mean")
    assert worst == pytest.approx(-0.10) and mean == pytest.approx(-0.05 / 3)
    assert details["gap"] == pytest.approx({"a": 0.05, "b": -0.10, "c": 0.0})


def test_stage_wall_time_is_recorded_while_the_stage_runs(tmp_path):
    """A build spans sessions and a killed stage never returns: its time reaches wall.json while it runs."""
    import time

    from mpt_edge.source_build import _timed

    timer = _timed(tmp_path, "source", every=0.05)
    with timer:
        deadline = time.monotonic() + 5
        while not (tmp_path / "wall.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.02)
        during = json.loads((tmp_path / "wall.json").read_text())
    after = json.loads((tmp_path / "wall.json").read_text())
    assert 0 < during["source"] <= after["source"] == after["total"]
