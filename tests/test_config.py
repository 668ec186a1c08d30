"""HCConfig refuses bad values by name and round-trips through the JSON a checkpoint stores."""

from __future__ import annotations

import pytest

from hcmemory import HCConfig

BAD_FIELDS = [
    ("key_codec", "zip"), ("value_placement", "gpu"), ("vq_codebook", "token"), ("vq_subvector_dim", 3),
    ("vq_centroids", 1), ("top_p", 0.0), ("top_p", 1.5), ("selection_queries", 0), ("selection_queries", True),
    ("recent_tokens", -1), ("chunk_size", 0), ("rescore", "yes"), ("rescore_keys", "int5"),
    ("rescore_residual", 1), ("rescore_residual", True),  # True with key_codec="none": nothing to refine
    ("quant_group_size", 0), ("quant_group_size", 32.0), ("quant_rotation", "yes"), ("full_precision_window", 1),
    ("residual_symmetric", True),  # without an int residual there is nothing to centre
]


@pytest.mark.core
@pytest.mark.parametrize(("field", "value"), BAD_FIELDS)
def test_an_invalid_field_is_named_in_the_error(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"HCConfig\.{field}="):
        HCConfig(**{field: value})


@pytest.mark.core
def test_budget_and_eviction_come_together() -> None:
    with pytest.raises(ValueError, match="budget"):
        HCConfig(budget=1024)
    with pytest.raises(ValueError, match="budget"):
        HCConfig(eviction="hc")
    assert HCConfig(eviction="hc", budget=1024).budget == 1024


@pytest.mark.core
@pytest.mark.parametrize("name", HCConfig.presets())
def test_every_preset_is_valid_and_survives_json(name: str) -> None:
    config = HCConfig.preset(name)
    assert HCConfig.from_dict(config.to_dict()) == config


@pytest.mark.core
def test_unknown_preset_and_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="available presets"):
        HCConfig.preset("hc-3")
    with pytest.raises(ValueError, match="colour"):
        HCConfig.from_dict({**HCConfig().to_dict(), "colour": "red"})


def test_a_command_line_spec_is_a_preset_with_typed_overrides() -> None:
    config = HCConfig.from_spec("compact:rescore_residual=false,top_p=0.95,kernel=torch")
    assert config == HCConfig.preset("compact", rescore_residual=False, top_p=0.95, kernel="torch")
    assert HCConfig.from_spec("hc-12.5") == HCConfig.preset("hc-12.5")
    with pytest.raises(ValueError, match="unknown HCConfig preset 'nope'"):
        HCConfig.from_spec("nope:top_p=0.5")
    with pytest.raises(ValueError, match="kernel"):
        HCConfig.from_spec("hc-12.5:kernel=gpu")
