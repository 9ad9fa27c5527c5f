"""The mesh file: its validation (every problem at once, naming file, service and key) and `onnxmesh check`.

Mesh files are written in temporary folders; the models are small ones built here (an ONNX
Identity-like graph and a Python model), so nothing depends on the demo.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from meshctl.check import check_models
from meshctl.cli import main as cli_main
from meshctl.mesh import MeshFileError, load_mesh
from orchestrator.spec import parse_spec
from tests.unit.mesh_fakes import DOUBLE, SIGNATURE, mesh, python_model, write


def problems(path: Path) -> list[str]:
    with pytest.raises(MeshFileError) as caught:
        load_mesh(path)
    return caught.value.problems


def test_a_good_mesh_lays_out_ports_from_one_base(folder: Path) -> None:
    loaded = load_mesh(write(folder, mesh(folder, base_port=9000)))
    assert loaded.ports() == {"double": 9011, "negate": 9021, "orchestrator": 9001}
    assert loaded.ports(7000) == {"double": 7011, "negate": 7021, "orchestrator": 7001}
    assert loaded.services["double"].replicas == 2
    assert loaded.services["double"].model_dir == folder / "models/double"
    # The orchestrator reads the same file as its spec: services it runs have no address there.
    spec = parse_spec(yaml.safe_load((folder / "mesh.yaml").read_text()))
    assert spec.services["double"].address == ""


def test_every_problem_is_reported_at_once_naming_file_service_and_key(folder: Path) -> None:
    body = mesh(folder)
    body["services"]["double"]["runtime"] = "pyton"
    body["services"]["negate"]["model_dir"] = "models/nowhere"
    body["services"]["extra"] = {"runtime": "onnx", "model_dir": "models/negate", "port": 8011}
    body["graphs"]["double-negate"]["steps"][1]["service"] = "negator"
    found = problems(write(folder, body))
    path = str(folder / "mesh.yaml")
    assert all(p.startswith(path + ": ") for p in found)
    text = "\n".join(found)
    assert "services.double.runtime: unknown runtime 'pyton'; one of onnx, python" in text
    assert "services.negate.model_dir: model directory" in text and "does not exist" in text
    assert "graphs.double-negate:" in text and "unknown service 'negator'" in text
    assert "services.extra.port: port 8011" in text and "also double's" in text
    assert len(found) == 4


def test_a_python_model_without_a_signature_is_refused(folder: Path) -> None:
    python_model(folder / "models/double", "unsigned", DOUBLE, {"max_batch_size": 4})
    (found,) = problems(write(folder, mesh(folder)))
    assert "services.double.model_dir" in found
    assert "Python model 'unsigned' has no signature" in found


def test_keys_settings_and_resources_are_checked(folder: Path) -> None:
    body = mesh(folder, orchestrator={"replicas": 0})
    body["services"]["double"].update(
        settings={"inference_workers": "many", "port": 1},
        resources={"requests": {"cpu": "lots"}},
        requirements=["pillow==11.3.0"],
        replica=3,
    )
    body["services"]["negate"]["requirements"] = ["numpy"]
    text = "\n".join(problems(write(folder, body)))
    assert "services.double.replica: unknown key" in text
    assert "services.double.settings.inference_workers: bad value 'many'" in text
    assert "services.double.settings.port: the mesh sets this itself" in text
    assert "services.double.resources.requests.cpu: not a Kubernetes quantity" in text
    assert "services.negate.requirements: extra pip requirements are for python services" in text
    assert "orchestrator.replicas: must be a whole number of at least 1" in text


def test_check_loads_every_model_and_checks_graphs_against_signatures(folder: Path) -> None:
    report = check_models(load_mesh(write(folder, mesh(folder))), say=lambda line: None)
    assert report.problems == []
    # A graph reading a tensor the model does not make is caught before anything starts.
    body = mesh(folder)
    body["graphs"]["double-negate"]["steps"][1]["inputs"] = {"y": "d.w"}
    report = check_models(load_mesh(write(folder, body)), say=lambda line: None)
    (problem,) = report.problems
    assert "graphs.double-negate" in problem and "'w'" in problem


def test_check_reports_a_model_py_that_does_not_import(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python_model(folder / "models/double", "broken", "import not_a_module_anywhere\n", SIGNATURE)
    assert cli_main(["check", str(write(folder, mesh(folder)))]) == 1
    err = capsys.readouterr().err
    assert "services.double: model broken version 1 does not load" in err
    assert "not_a_module_anywhere" in err


def test_check_passes_a_good_mesh(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["check", str(write(folder, mesh(folder)))]) == 0
    out = capsys.readouterr().out
    assert "graph double-negate: ok  (x FP32[-1, 2]) -> (z FP32[-1, 2])" in out
    assert out.rstrip().endswith("ok")


def test_the_cli_finds_the_mesh_file_of_the_folder_it_runs_in(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshctl import targets

    write(folder, mesh(folder, base_port=9000))
    monkeypatch.delenv(targets.MESH_ENV, raising=False)
    monkeypatch.chdir(folder)
    assert targets.mesh_path() == folder / "mesh.yaml"
    assert targets.local_endpoints()["negate"] == "127.0.0.1:9021"
    assert targets.model_services()["double"] == "double"
    assert targets.default_target("double-negate") == "127.0.0.1:9001"


def test_predict_makes_a_models_inputs_from_the_graph_that_feeds_it(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshctl import targets
    from orchestrator.spec.steps import TensorRef

    monkeypatch.setenv(targets.MESH_ENV, str(write(folder, mesh(folder))))
    graph, ref = targets.upstream("negate", "y") or (None, None)
    assert graph is not None and graph.name == "double-negate" and ref == TensorRef("d", "y")
    assert targets.upstream("double", "x") == (graph, TensorRef("request", "x"))
    assert targets.upstream("negate", "nothing") is None


def test_a_mesh_without_a_client_file_takes_inputs_as_arrays(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from meshctl import cli, predict, targets

    path = write(folder, mesh(folder))
    monkeypatch.setenv(targets.MESH_ENV, str(path))
    args = cli.build_parser().parse_args(["predict"])
    assert args.name is None and not hasattr(args, "index")  # no client file: no demo options
    np.save(folder / "x.npy", np.ones((1, 2), np.float32))
    samples = predict.given_inputs([predict.parse_input(f"x={folder / 'x.npy'}")])
    assert len(samples) == 1 and samples.inputs["x"].shape == (1, 2) and samples.labels is None
    with pytest.raises(SystemExit):
        cli.main(["predict", "--target", "127.0.0.1:1", "--input", "x"])
    assert "expected NAME=FILE.npy" in capsys.readouterr().err
    assert cli.main(["predict", "--mesh", str(path), "--target", "127.0.0.1:1"]) == 1
    assert "names no client file: give the inputs with --input NAME=FILE.npy" in capsys.readouterr().err


def test_a_client_file_must_exist_and_be_python(folder: Path) -> None:
    assert any(
        "client: must name a Python file" in p for p in problems(write(folder, mesh(folder, client=3)))
    )
    assert any("is not a file" in p for p in problems(write(folder, mesh(folder, client="no.py"))))
