"""The card table: forgiving names, a refusal that lists close matches, and what `--vram` / `--capability` mean."""

from __future__ import annotations

import pytest

from cogbatch.errors import ConfigError
from cogbatch.planning.gpus import CONTEXT_RESERVE, GPUS, GiB, find_gpu, plan_target


@pytest.mark.parametrize(
    "query, name",
    [("3060", "RTX 3060 12GB"), ("rtx3060 12gb", "RTX 3060 12GB"), ("RTX 3060 12GB", "RTX 3060 12GB"),
     ("NVIDIA GeForce RTX 3060", "RTX 3060 12GB"), ("3060 ti", "RTX 3060 Ti"), ("rtx-3060-ti", "RTX 3060 Ti"),
     ("2080ti", "RTX 2080 Ti"), ("3080 10GB", "RTX 3080 10GB"), ("4060 Ti 16 GiB", "RTX 4060 Ti 16GB"),
     ("Tesla T4", "T4"), ("a10", "A10"), ("A10G", "A10G"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
     ("a100 40g", "A100 40GB"), ("Tesla V100-SXM2-32GB", "V100 32GB"), ("NVIDIA H100 80GB HBM3", "H100 80GB"),
     ("h100", "H100 80GB"), ("NVIDIA RTX A6000", "RTX A6000"), ("a6000", "RTX A6000"), ("L40S", "L40S")],
)  # fmt: skip
def test_a_card_is_found_however_it_is_spelt(query, name):
    assert find_gpu(query).name == name


def test_every_card_is_found_by_its_own_name_and_has_sane_numbers():
    for gpu in GPUS:
        assert find_gpu(gpu.name) is gpu
        assert 7.5 * GiB <= gpu.memory <= 80 * GiB and (7, 0) <= gpu.capability <= (9, 0), gpu
        assert gpu.memory <= gpu.nominal_gb * GiB  # ECC and the driver only ever take memory away


@pytest.mark.parametrize(
    "query, listed",
    [("3080", ["RTX 3080 10GB", "RTX 3080 12GB"]), ("A100", ["A100 40GB", "A100 80GB"]),
     ("4060 ti", ["RTX 4060 Ti 8GB", "RTX 4060 Ti 16GB"]), ("v100", ["V100 16GB", "V100 32GB"])],
)  # fmt: skip
def test_a_name_of_several_cards_lists_them(query, listed):
    with pytest.raises(ConfigError, match="matches") as e:
        find_gpu(query)
    assert all(name in str(e.value) for name in listed)


def test_an_unknown_card_lists_the_close_ones_and_the_way_out():
    with pytest.raises(ConfigError) as e:
        find_gpu("RTX 5090")
    message = str(e.value)
    assert "not a card cogbatch knows (close: RTX 4090" in message and "--vram SIZE --capability X.Y" in message
    with pytest.raises(ConfigError, match="known: RTX 2080 Ti, "):  # nothing close: the whole table
        find_gpu("Radeon")


def test_the_target_of_each_option():
    card = plan_target("RTX 3060 12GB", None, None)
    assert (card.memory, card.capability, card.reserve) == (12 * GiB, (8, 6), CONTEXT_RESERVE)
    assert card.usable == 12 * GiB - CONTEXT_RESERVE == int(11.5 * GiB)
    sized = plan_target(None, "16GiB", "7.5")
    assert (sized.memory, sized.capability) == (16 * GiB, (7, 5))
    assert sized.name == "a 16.00 GiB card (compute capability 7.5)"
    assert plan_target(None, "16GiB", None).capability is None  # planned as sm80+, and the report says so
    assert plan_target(None, None, None) is None
    assert card.to_dict()["capability"] == "8.6" and card.to_dict()["usable_bytes"] == card.usable


@pytest.mark.parametrize(
    "args, message",
    [(("3060", "12GiB", None), "give --gpu, or --vram and --capability"),
     ((None, None, "8.6"), "--capability needs --vram SIZE"),
     ((None, "12GiB", "sm86"), "--capability: expected a compute capability such as 8.6"),
     ((None, "twelve", None), "--vram: cannot read a size"),
     ((None, "256MiB", None), "leaves nothing beside the CUDA context")],
)  # fmt: skip
def test_option_mistakes_are_config_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        plan_target(*args)
