"""Finding projectors through the `outbox.projectors` entry points, and what the runtime
imports: no server needed."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest
import sqlalchemy.exc

from projectors.discovery import (
    GROUP,
    ProjectorConflict,
    ProjectorNotFound,
    load_spec,
    load_specs,
    projector_names,
)
from projectors.spec import ProjectorSpec
from projectors.transient_errors import SinkUnavailable, transient_check
from tests.relay_harness import ROOT


class _Sink:
    name = "sink"
    aggregate_types = ("order",)

    def apply(self, events: list) -> None:
        pass

    def close(self) -> None:
        pass


ALPHA = ProjectorSpec(name="alpha", metrics_port=9501, factory=lambda s, stop: _Sink())
BETA = ProjectorSpec(name="beta", metrics_port=9502, factory=lambda s, stop: _Sink())
BETA_ON_ALPHA_PORT = ProjectorSpec(name="beta", metrics_port=9501,
                                   factory=lambda s, stop: _Sink())
NOT_A_SPEC = object()


def _ep(name: str, attr: str) -> EntryPoint:
    return EntryPoint(name, f"{__name__}:{attr}", GROUP)


def test_specs_are_loaded_from_the_group_by_name():
    found = [_ep("beta", "BETA"), _ep("alpha", "ALPHA")]
    assert projector_names(found) == ["alpha", "beta"]
    assert load_spec("beta", found) is BETA
    assert load_specs(found) == {"alpha": ALPHA, "beta": BETA}


def test_the_installed_group_holds_the_built_in_projectors_on_their_ports():
    specs = load_specs()
    assert {n: specs[n].metrics_port for n in ("ocr", "embed", "search", "cache")} == \
        {"ocr": 9465, "embed": 9466, "search": 9467, "cache": 9468}
    assert [n for n in ("search", "cache", "ocr") if specs[n].rebuild] == ["search", "cache"]


def test_a_name_declared_twice_is_refused():
    with pytest.raises(ProjectorConflict, match="'alpha' is declared twice"):
        projector_names([_ep("alpha", "ALPHA"), _ep("alpha", "BETA")])
    # The same entry point seen twice (one distribution found on two paths) is one.
    assert projector_names([_ep("alpha", "ALPHA"), _ep("alpha", "ALPHA")]) == ["alpha"]


def test_two_projectors_on_one_default_port_are_refused():
    with pytest.raises(ProjectorConflict, match="both default to port 9501"):
        load_specs([_ep("alpha", "ALPHA"), _ep("beta", "BETA_ON_ALPHA_PORT")])


def test_an_entry_point_must_load_the_spec_it_names():
    with pytest.raises(ProjectorConflict, match="loads the spec of 'beta'"):
        load_spec("alpha", [_ep("alpha", "BETA")])
    with pytest.raises(ProjectorConflict, match="is not a ProjectorSpec"):
        load_spec("alpha", [_ep("alpha", "NOT_A_SPEC")])


def test_an_unknown_name_lists_the_installed_projectors():
    with pytest.raises(ProjectorNotFound) as raised:
        load_spec("gamma", [_ep("alpha", "ALPHA"), _ep("beta", "BETA")])
    assert str(raised.value) == "unknown projector 'gamma'; installed projectors: alpha, beta"


def test_outbox_project_with_an_unknown_name_exits_2_listing_the_installed():
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "project", "no-such"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "unknown projector 'no-such'; installed projectors: " in done.stderr
    assert "cache, embed, ocr, search" in done.stderr


def test_outbox_rebuild_of_a_projector_without_a_view_exits_2():
    done = subprocess.run([sys.executable, "-m", "outbox.cli", "rebuild", "ocr"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 2
    assert "'ocr' has no rebuildable view; rebuildable: cache, search" in done.stderr


def test_a_projectors_outages_add_to_the_generic_ones():
    by_types = transient_check((KeyError,))
    by_function = transient_check(lambda exc: "busy" in str(exc))
    for check in (by_types, by_function):
        assert check(ConnectionResetError())
        assert check(SinkUnavailable("index missing"))
        assert check(sqlalchemy.exc.OperationalError("select 1", {}, Exception("gone")))
        assert not check(ValueError("bad payload"))
    assert by_types(KeyError("x")) and not by_function(KeyError("x"))
    assert by_function(RuntimeError("busy")) and not by_types(RuntimeError("busy"))


def test_the_runtime_imports_no_store_client():
    code = ("import sys, projectors.runtime, projectors.registry, projectors.discovery, "
            "audit_log_projector\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules} & {'botocore', "
            "'boto3', 'elasticsearch', 'elastic_transport', 'redis'})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    assert done.stdout.strip() == ""
