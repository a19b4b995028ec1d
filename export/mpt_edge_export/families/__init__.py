"""The backbone families and the registry that maps a transformers `model_type` to one.

Each family lives in its own folder and declares a `Family` (families/family.py); code elsewhere asks that
object (`backbone.family.uses_heads`, `.generates`, `.adapter(...)`) and never compares family names.
Adding a family: one folder, one line in `FAMILIES`, tests (docs/adding-a-family.md).
"""

from __future__ import annotations

from mpt_edge.errors import UnsupportedBackboneError
from mpt_edge_export.families import causal, encoder, seq2seq
from mpt_edge_export.families.family import FeaturesFusion, Family, GenerationGraphs

FAMILIES: dict[str, Family] = {f.name: f for f in (causal.FAMILY, encoder.FAMILY, seq2seq.FAMILY)}


def family_for_model_type(model_type: str) -> Family:
    """The family that handles a transformers `config.model_type`."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(f"{f.name} {sorted(f.model_types)}" for f in FAMILIES.values())
    raise UnsupportedBackboneError(f"backbone model_type {model_type!r} belongs to no supported family; supported: {supported}")


def family_named(name: str) -> Family:
    """The registered family called `name` (as recorded in checkpoints and bundle manifests)."""
    if name not in FAMILIES:
        raise UnsupportedBackboneError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def adapter_for(name: str, **options):
    """The adapter of the family called `name`; options go to the adapter's constructor (tests and benches)."""
    return family_named(name).adapter_class(**options)

__all__ = ["FAMILIES", "Family", "FeaturesFusion", "GenerationGraphs", "UnsupportedBackboneError", "adapter_for", "family_for_model_type",
           "family_named"]
