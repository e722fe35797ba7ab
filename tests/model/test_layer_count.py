"""A config.json whose layer count its checkpoint cannot fill is refused in one line before any layer is built
(10^7 layers of a 2-layer checkpoint used to build 10^7 layers, minutes and gigabytes)."""

from __future__ import annotations

import json

import pytest

import helpers
from nibble.errors import NibbleError
from nibble.model import load_model


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_5_text"])
def test_more_layers_than_tensors_is_refused_in_one_line(tmp_path, model_type):
    path = helpers.save_hf_model(helpers.make_hf_model(model_type), tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 10**9
    config.pop("layer_types", None)  # (Qwen3.5 derives one per layer from the count)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(NibbleError) as info:
        load_model(path)
    message = str(info.value)
    assert "config.json" in message and "'num_hidden_layers' is 1000000000" in message and "\n" not in message
