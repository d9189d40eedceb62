"""Checkpoints and config dicts written before the shared configuration vocabulary still load.

``data/legacy/`` was written by the code of commit ``a57be31`` (before the family configs were
rebuilt from shared pieces):

- ``legacy_<family>.pt``: a checkpoint as ``instseg-edu train`` writes it (``meta.model``,
  ``meta.model_config`` with that code's key names, the model's state dict — stored in float16 to
  keep the files small — and a sample of the model's forward outputs on the image
  :func:`_image` in ``test_outputs``). Every config value differs from the defaults, so a key that
  is read wrongly changes the rebuilt config or the outputs.
- ``legacy_presets.json``: ``config_to_dict`` of every preset of the four family modules.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instseg_edu import cli
from instseg_edu.engine.checkpoint import config_from_dict, load_checkpoint

DATA = Path(__file__).with_name("data") / "legacy"
FAMILIES = ("retinanet", "mask_rcnn", "solo", "yolact")


def _image() -> torch.Tensor:
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _outputs(family: str, model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        outs = model(_image())
    if family == "solo":
        return {"mask_logits_0": outs.mask_logits[0], "cate_logits_0": outs.cate_logits[0]}
    found = {
        k: v
        for k, v in outs._asdict().items()
        if isinstance(v, torch.Tensor) and k not in ("anchors", "anchor_levels")
    }
    if family == "mask_rcnn":
        found["features_0"] = outs.features[0]
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_old_checkpoint_rebuilds_the_same_model(family):
    path = DATA / f"legacy_{family}.pt"
    model, meta = cli._model_from_checkpoint(str(path), "cpu")
    expected = load_checkpoint(path)["test_outputs"]
    got = _outputs(family, model)
    assert set(got) == set(expected)
    for name, sample in expected.items():
        values = got[name].flatten()[:: max(1, got[name].numel() // 256)]
        torch.testing.assert_close(values, sample, rtol=1e-4, atol=1e-5, msg=name)
    assert meta["model"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_old_preset_dicts_rebuild_today_s_presets(family):
    presets = json.loads((DATA / "legacy_presets.json").read_text())
    module = cli._family_module(family)
    config_cls = getattr(module, cli.FAMILIES[family][2])
    names = [k.split(".", 1)[1] for k in presets if k.startswith(family + ".")]
    assert names, family
    for name in names:
        rebuilt = config_from_dict(config_cls, presets[f"{family}.{name}"])
        assert rebuilt == getattr(module, name), name
