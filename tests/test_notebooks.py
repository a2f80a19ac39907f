"""The notebooks are stored without outputs, match their generator (notebooks/make_notebooks.py), and run
headless (nbclient) at the tiny toy-world size on 8 simulated CPU devices (their meshes span all of them); the
two share one toy-world cache, so the world is built once. The README's Colab links come from the generator's
one REPO_URL."""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NB_DIR = REPO / "notebooks"
NAMES = ["proxy_tuning.ipynb", "distillation.ipynb"]


def load_generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NB_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs_and_in_sync(name):
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"
    fresh = load_generator().build(name)
    assert [c.source for c in nb.cells] == [c.source for c in fresh.cells], \
        f"{name} differs from make_notebooks.py: run python notebooks/make_notebooks.py"
    install = nb.cells[1]
    assert "colab-install" in install.metadata.get("tags", []) and "if IN_COLAB:" in install.source


def test_repository_url_is_set_in_one_place():
    gen = load_generator()
    readme = (REPO / "README.md").read_text()
    assert gen.readme_with_links(readme) == readme, "README's Colab links are stale: run notebooks/make_notebooks.py"
    for name in NAMES:
        assert gen.colab_url(name) in readme
        assert gen.REPO_URL.removeprefix("https://github.com/") in gen.colab_url(name)
        install = nbformat.read(NB_DIR / name, as_version=4).cells[1].source
        assert f'"{gen.REPO_URL}"' in install


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory):
    env = {"PROXYTUNE_NOTEBOOK_SIZE": "tiny", "PROXYTUNE_CACHE": str(tmp_path_factory.mktemp("nbcache")),
           "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    nb = nbformat.read(NB_DIR / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return nb


def text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


MESHES = "decode mesh {'data': 8, 'fsdp': 1, 'tensor': 1} | train mesh {'data': 4, 'fsdp': 2, 'tensor': 1}"


def test_proxy_tuning_notebook_runs(shared_env, tmp_path):
    nb = execute("proxy_tuning.ipynb", tmp_path)
    out = text_outputs(nb)
    assert "8 cpu device(s)" in out and MESHES in out
    for row in ("base-large", "tuned-small (expert)", "proxy-tuned large", "tuned-large (target)", "dexperts"):
        assert row in out
    assert "gap closed" in out and "top-1 tokens changed" in out
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", []))  # the alpha-sweep plot


def test_distillation_notebook_runs(shared_env, tmp_path):
    nb = execute("distillation.ipynb", tmp_path)
    out = text_outputs(nb)
    for row in ("teacher (tuned-large)", "sft (gold answers)", "first top-5", "reverse_kl"):
        assert row in out
    assert "ECE (10 bins)" in out
    assert (tmp_path / "reliability_toyworld.png").stat().st_size > 1000
    # the sharded run: params over fsdp, its metrics, TensorBoard events, gen_eval and the curves PNG
    assert "8 cpu device(s)" in out and MESHES in out
    sharded = re.search(r"(\d+) of (\d+) student param arrays sharded over fsdp", out)
    assert sharded and int(sharded.group(1)) > 0, out[-2000:]
    run = tmp_path / "distill_run"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "gen_eval_accuracy" in l] == [0, 6]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "distill_curves.png").stat().st_size > 1000
    assert "generation-based eval: {'gen_eval_accuracy'" in out
