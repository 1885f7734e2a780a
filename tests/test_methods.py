import pytest
from torch import nn

from erasure.errors import InvalidArgumentError
from erasure.training.methods import METHODS, select_parameters

from factories import tiny_unet


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()  # SD-style layout: cross-attention in down, mid and up blocks


def linear_conv_params(unet):
    out = {}
    for mname, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for p, _ in module.named_parameters(recurse=False):
                out[f"{mname}.{p}"] = mname
    return out


def test_esd_x_is_exactly_the_cross_attention_projections(unet):
    names = select_parameters(unet, "esd-x")
    attn2_blocks = sorted({n.split(".attn2.")[0] for n in names})
    assert len(attn2_blocks) == 4  # down (1), mid (1), up (layers_per_block + 1)
    expected = []
    for block in attn2_blocks:
        expected += [f"{block}.attn2.to_q.weight", f"{block}.attn2.to_k.weight", f"{block}.attn2.to_v.weight",
                     f"{block}.attn2.to_out.0.weight", f"{block}.attn2.to_out.0.bias"]
    assert sorted(names) == sorted(expected)


def test_esd_x_strict_is_keys_and_values_only(unet):
    names = select_parameters(unet, "esd-x-strict")
    assert names and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in names)
    assert len(names) == 8


def test_esd_u_is_everything_else_and_never_norms(unet):
    esd_u, esd_x, esd_all = (set(select_parameters(unet, m)) for m in ("esd-u", "esd-x", "esd-all"))
    assert esd_u.isdisjoint(esd_x)
    assert esd_u | esd_x == esd_all == set(linear_conv_params(unet))
    assert "conv_in.weight" in esd_u and "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in esd_u
    state = dict(unet.named_parameters())
    assert not any("norm" in n and state[n].dim() == 1 and "conv" not in n for n in esd_all)
    assert all(n in state for n in esd_all)


def test_unknown_method_is_an_error(unet):
    with pytest.raises(InvalidArgumentError, match="unknown method 'esd-xx'"):
        select_parameters(unet, "esd-xx")
    assert set(METHODS) == {"esd-x", "esd-x-strict", "esd-u", "esd-all", "uce"}
