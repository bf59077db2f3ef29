"""The exports' templates: every placeholder filled in exactly once, values never read again as template text."""

from __future__ import annotations

import pytest

from scaleq.export import render


def test_values_go_in_as_they_are() -> None:
    text = render.render(
        "k8s/README.md.tmpl", **dict.fromkeys(render.placeholders("k8s/README.md.tmpl"), "@{grid_name} $x")
    )
    assert "@{" not in text.replace("@{grid_name} $x", "")
    assert text.startswith("# scaleq grid `@{grid_name} $x` on Kubernetes")


def test_a_missing_or_unused_value_is_an_error() -> None:
    names = render.placeholders("terraform/README.md.tmpl")
    values = dict.fromkeys(names, "v")
    with pytest.raises(ValueError, match="placeholders"):
        render.render("terraform/README.md.tmpl", **{k: v for k, v in values.items() if k != "table"})
    with pytest.raises(ValueError, match="placeholders"):
        render.render("terraform/README.md.tmpl", **values, extra="v")


def test_fixed_files_are_read_as_they_are() -> None:
    text = render.text("terraform/locals.tf")
    assert '"${k}=${v}\\n"' in text  # Terraform's own interpolations and escapes, untouched
    # (the worker's start script, with the shell's arrays, is scaleq.providers.gcp.boot's, copied as it is)
