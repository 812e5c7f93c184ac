"""Every malformed file ends in a ManifestError naming the file, never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import structlog
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bad_manifests import BAD_FILES
from tests.unit.test_manifests import (
    DNS,
    StateHandler,
    eventually,
    running,
    service_doc,
    source_for,
)
from uproxy.cli import cli
from uproxy.sources.manifest_loader import MAX_DEPTH, load_file_collecting

VALID = (
    "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n"
    "spec:\n  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n"
    "  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n    protocol: TCP\n"
    "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n"
    "  namespace: default\n  labels:\n    kubernetes.io/service-name: web\n"
    "addressType: IPv4\nports:\n- name: http\n  port: 8080\n  protocol: TCP\n"
    "endpoints:\n- addresses: [10.0.0.1]\n  conditions: {ready: true}\n"
)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_clear_error(tmp_path: Path, case: str) -> None:
    name, data, phrase = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    loaded, errors = load_file_collecting(path)
    assert len(errors) == 1
    assert str(errors[0]).startswith(f"{path}")
    assert phrase in str(errors[0])
    assert not loaded.services and not loaded.slices


@pytest.mark.parametrize(("lists", "over"), [(MAX_DEPTH - 3, False), (MAX_DEPTH - 2, True)])
def test_nesting_bound_is_exact(tmp_path: Path, lists: int, over: bool) -> None:
    # The document (1), metadata (2) and annotations (3) hold `lists` nested lists.
    inner = "[" * lists + "]" * lists
    path = tmp_path / "deep.yaml"
    path.write_text(VALID.replace("name: web\n", f"name: web\n  annotations: {{a: {inner}}}\n", 1))
    _, errors = load_file_collecting(path)
    assert bool([e for e in errors if f"nested deeper than {MAX_DEPTH}" in str(e)]) is over


def test_a_date_where_a_string_belongs_names_the_object(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(VALID.replace("clusterIP: 10.96.0.10", "clusterIP: 2001-12-01"))
    _, errors = load_file_collecting(path)
    assert errors and "default/web" in str(errors[0]) and str(errors[0]).startswith(str(path))


def test_the_valid_manifest_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(VALID)
    loaded, errors = load_file_collecting(path)
    assert errors == [] and loaded.services and loaded.slices


def write_bytes(path: Path, data: bytes) -> None:
    # Atomically, so the source never reads half a file.
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


# Mutations: replace, insert or delete a span of the valid manifest with YAML-ish debris.
_DEBRIS = st.sampled_from(
    [
        "!!bool maybe",
        "!!float abc",
        "!<tag:yaml.org,2002:int> 12a",
        "2001-13-01",
        "1999-12-31 25:00:00",
        "9" * 5000,
        "[" * 80,
        "{",
        "&a [*a]",
        "*nope",
        "\x00",
        "\t",
        "- ",
        ": ",
        "---",
        "null",
        "1e999",
        "-0x1",
        "0o777",
        ".nan",
        "~",
        "'",
        '"',
        "é",
        "\ufeff",
    ]
)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        start = draw(st.integers(0, len(text)))
        end = draw(st.integers(start, min(len(text), start + 20)))
        piece = draw(st.one_of(_DEBRIS, st.text(max_size=8)))
        text = text[:start] + piece + text[end:]
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = draw(st.binary(max_size=4)) + data
    return data


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=_mutated())
def test_check_on_any_mutation_answers(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "mutated.yaml"
    path.write_bytes(data)
    result = CliRunner().invoke(cli, ["check", "--config", str(path)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 1:
        assert str(path) in result.output


def test_yaml_module_is_the_safe_loader() -> None:
    # The loader must never build arbitrary Python objects.
    path_text = "!!python/object/apply:os.system ['true']"
    with pytest.raises(yaml.YAMLError):
        yaml.load(path_text, Loader=yaml.SafeLoader)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
async def test_running_source_keeps_last_good_state_and_names_the_file(
    tmp_path: Path, case: str
) -> None:
    name, data, phrase = BAD_FILES[case]
    good = tmp_path / name
    text = service_doc()
    good.write_text(json.dumps(yaml.safe_load(text)) if name.endswith(".json") else text)
    handler = StateHandler()
    with structlog.testing.capture_logs() as logs:
        async with running(source_for(tmp_path), handler):
            assert handler.port() == 80
            write_bytes(good, data)
            (tmp_path / "marker.yaml").write_text(service_doc("dns", port=53))
            await eventually(lambda: handler.port(DNS) == 53)  # the bad file was read by now
            assert handler.port() == 80
    invalid = [e for e in logs if e["event"] == "manifest_invalid" and e["path"] == str(good)]
    assert invalid and phrase in invalid[0]["error"], invalid
    assert not [e for e in logs if e["event"] == "manifest_source_error"]
