"""Notebook tier: the percent ``.py`` files are the source; their ``.ipynb`` twins must not drift.

- pairing: for every ``notebooks/NN_*.py`` the ``.ipynb`` exists, has the same cells (type and
  source, as jupytext reads them) and no outputs, so a learner opens a clean notebook;
- execution: every notebook runs top to bottom with nbclient under ``INSTSEG_SMOKE=1`` (reading the
  ``.py`` directly) in a temporary working directory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
IDS = [p.stem for p in NOTEBOOKS]
# A smoke run must stay well under a minute on a CPU; two test workers share two cores, so allow
# some slack over the 60 s target before calling it a failure.
SMOKE_BUDGET_S = float(os.environ.get("INSTSEG_NOTEBOOK_BUDGET_S", "120"))


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    for required in ("01_data_and_coco", "02_anchors", "03_assignment_and_box_coding"):
        assert required in names


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_ipynb_is_paired_and_output_free(py: Path):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --to ipynb --update {py.relative_to(ROOT)}"
    from_py = jupytext.read(py)
    from_ipynb = jupytext.read(ipynb)
    assert _cells(from_ipynb) == _cells(from_py), (
        f"{ipynb.name} drifted from {py.name}; regenerate with "
        f"`jupytext --to ipynb --update {py.relative_to(ROOT)}`"
    )
    for cell in from_ipynb.cells:
        if cell.cell_type == "code":
            assert cell.get("outputs", []) == [], f"{ipynb.name} has outputs committed"
            assert cell.get("execution_count") is None, f"{ipynb.name} has execution counts"
    # The first code cell is the parameters cell; its tier comes from the one library function.
    first_code = next(c for c in from_py.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", [])
    assert "TIER = select_tier()" in first_code.source
    assert "describe_tier(TIER" in first_code.source
    # Opening the .ipynb in JupyterLab starts the Python kernel without asking.
    assert from_ipynb.metadata.get("kernelspec", {}).get("name") == "python3"


# Notebooks that train, and the family whose recipe they take.
TRAINING = {"04_retinanet": "retinanet", "06_mask_rcnn": "mask_rcnn", "07_solo": "solo",
            "08_yolact": "yolact"}  # fmt: skip
# Notebooks that compare all four families (loading the training notebooks' models or training
# the missing ones themselves).
COMPARING = {"09_four_families"}


@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_parameters_cell_picks_the_cpu_tier_without_cuda(py: Path, monkeypatch, capsys, tmp_path):
    """A laptop: no CUDA, no INSTSEG_SMOKE, no INSTSEG_TIER, no notebook run before (nothing in
    ``runs/``). Runs only the parameters cell."""
    import torch

    from instseg_edu import recipes

    for name in (recipes.TIER_ENV, recipes.SMOKE_ENV, recipes.STEPS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # The cell times two training steps for its line; a fixed time keeps this test fast.
    monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *args, **kwargs: 0.25)
    first_code = next(c for c in jupytext.read(py).cells if c.cell_type == "code")
    namespace: dict = {}
    exec(compile(first_code.source, f"{py.name}[parameters]", "exec"), namespace)
    assert namespace["TIER"] == "cpu" and namespace["SMOKE"] is False
    printed = capsys.readouterr().out
    assert printed.startswith("tier 'cpu' (no CUDA device)"), printed
    if py.stem in COMPARING:
        # without the pretraining: its minute would not fit the budget of 50 s
        expected = {f: recipes.recipe(f, "cpu").override(pretrain_seconds=None)
                    for f in recipes.FAMILIES}  # fmt: skip
        assert namespace["RECIPES"] == expected
        lines = printed.splitlines()
        for line, r in zip(lines, namespace["RECIPES"].values()):
            assert line.startswith("tier 'cpu' (no CUDA device): " + r.model), line
        # The cpu tier's promise (<= 10 min on two cores) needs a training budget per family.
        budget = namespace["TRAIN_BUDGET_S"]
        assert budget is not None and 4 * budget <= 7 * 60
        assert f"trains here for {budget:g} s" in lines[len(recipes.FAMILIES)]
        return
    family = TRAINING.get(py.stem)
    if family is None:
        assert "trains no model" in printed
        return
    # The cpu tier trains the steps that fit in TRAIN_MINUTES here (and stops at the limit).
    r, minutes = namespace["RECIPE"], namespace["TRAIN_MINUTES"]
    assert minutes == 4.5 and r == recipes.fit_to_minutes(recipes.recipe(family, "cpu"), 4.5, 0.25)
    assert (namespace["IMAGE_SIZE"], namespace["TRAIN_STEPS"], namespace["MODEL"]) == (
        r.image_size, r.max_steps, r.model,
    )  # fmt: skip
    # RetinaNet, Mask R-CNN and YOLACT: the first minute pretrains the ResNet on object crops
    pretrain = recipes.recipe(family, "cpu").pretrain_seconds or 0.0
    assert (pretrain > 0) == (family != "solo")
    assert f"{r.max_steps} steps at most" in printed
    assert f"training ends at {4.5 - pretrain / 60:g} min" in printed
    assert r.max_minutes == 4.5 - pretrain / 60
    assert r.train_config().max_seconds == pytest.approx(270 - pretrain)


def test_yolact_notebook_gives_its_pretraining_up_for_notebook_06s_backbone(monkeypatch, capsys,
                                                                           tmp_path):  # fmt: skip
    """Notebook 08 after notebook 06 ran in the cpu tier (its model saved under ``runs/``): the
    ResNet will start from it, so the whole 4.5 minutes train YOLACT."""
    import torch

    from instseg_edu import recipes

    for name in (recipes.TIER_ENV, recipes.SMOKE_ENV, recipes.STEPS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(recipes, "measure_step_seconds", lambda r, *args, **kwargs: 0.25)
    saved = recipes.notebook_checkpoint("mask_rcnn", "cpu")
    saved.parent.mkdir(parents=True)
    saved.write_bytes(b"")  # the parameters cell only looks for it
    py = ROOT / "notebooks" / "08_yolact.py"
    first_code = next(c for c in jupytext.read(py).cells if c.cell_type == "code")
    namespace: dict = {}
    exec(compile(first_code.source, f"{py.name}[parameters]", "exec"), namespace)
    r = namespace["RECIPE"]
    assert r.pretrain_seconds is None and r.max_minutes == 4.5
    no_pretraining = recipes.recipe("yolact", "cpu").override(pretrain_seconds=None)
    assert r == recipes.fit_to_minutes(no_pretraining, 4.5, 0.25)
    assert "pretraining" not in capsys.readouterr().out


# The comparing notebook finds these families saved by their notebooks and trains the others, so
# one smoke run goes through both paths.
SAVED_BEFORE_COMPARING = ("mask_rcnn", "yolact")


def _save_as_training_notebook(family: str, tier: str, cwd: Path) -> None:
    """What notebook 04/06/07/08 saves after training (here after one step of its recipe)."""
    from instseg_edu.data.shapes import CLASSES
    from instseg_edu.engine.checkpoint import config_to_dict, save_checkpoint
    from instseg_edu.engine.train import train
    from instseg_edu.recipes import notebook_checkpoint, notebook_recipe, shapes_batch

    r = notebook_recipe(family, tier)
    cfg = r.model_config(len(CLASSES))
    model = r.build_model(len(CLASSES))
    batches = [shapes_batch(r.batch_size, r.image_size)]
    history = train(model, batches, r.train_config(max_steps=1, device="cpu", progress=False))
    save_checkpoint(cwd / notebook_checkpoint(family, tier), {
        "model": model.state_dict(),
        "recipe": r.as_dict(),
        "history": history.to_dict(),
        "meta": {"model": family, "preset": r.model, "model_config": config_to_dict(cfg),
                 "classes": list(CLASSES), "label_to_cat_id": list(range(1, len(CLASSES) + 1)),
                 "image_size": r.image_size},
    })  # fmt: skip


@pytest.mark.notebooks
@pytest.mark.timeout(300)
@pytest.mark.parametrize("py", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_smoke_mode(py: Path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("INSTSEG_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    kernel_tmp = tmp_path / "kernel_tmp"  # the kernel's temporary folder (its data goes there)
    kernel_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    if py.stem in COMPARING:
        for family in SAVED_BEFORE_COMPARING:
            _save_as_training_notebook(family, "smoke", tmp_path)
    nb = jupytext.read(py)
    client = NotebookClient(
        nb,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    assert elapsed < SMOKE_BUDGET_S, f"{py.name} took {elapsed:.1f} s in smoke mode"
    # The kernel has exited (nbclient shuts it down): its temporary data folder went with it.
    assert not [p.name for p in kernel_tmp.glob("instseg_shapes_*")]
    # Nothing is written next to the notebooks: datasets go to a temp dir or data/.
    assert not any(p.suffix in {".png", ".json"} for p in (ROOT / "notebooks").iterdir())
    if py.stem in COMPARING:
        from instseg_edu.recipes import FAMILIES

        printed = "".join(
            o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
        )
        names = {"retinanet": "RetinaNet", "mask_rcnn": "Mask R-CNN", "solo": "SOLO",
                 "yolact": "YOLACT"}  # fmt: skip
        for family in FAMILIES:
            loaded = f"{names[family]}: loaded runs/notebooks/smoke/{family}.pt"
            trained = f"{names[family]}: trained here"
            if family in SAVED_BEFORE_COMPARING:
                assert loaded in printed and trained not in printed, family
            else:
                assert trained in printed and loaded not in printed, family
    # A training notebook saves its model where a later notebook (or `instseg-edu evaluate`)
    # finds it, relative to the notebook's working directory.
    family = TRAINING.get(py.stem)
    if family is not None:
        from instseg_edu.engine.checkpoint import load_checkpoint
        from instseg_edu.recipes import notebook_checkpoint

        ckpt = load_checkpoint(tmp_path / notebook_checkpoint(family, "smoke"))
        assert ckpt["recipe"]["family"] == family and ckpt["recipe"]["tier"] == "smoke"
        assert ckpt["meta"]["model"] == family and ckpt["model"]
        assert len(ckpt["history"]["steps"]) == ckpt["recipe"]["max_steps"]
