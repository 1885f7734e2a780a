"""Conditioning reproduces what the diffusers pipeline feeds its UNet."""

import torch

from erasure.base.conditioning import Conditioning
from erasure.base.families import conditioner_for


def test_sd_conditioning_matches_the_pipeline(random_pipe):
    cond = conditioner_for(random_pipe)
    c = cond.encode(["a red circle", "a blue star", "a red circle"])
    expected, negative = random_pipe.encode_prompt(["a red circle", "a blue star", "a red circle"], "cpu", 1,
                                                   do_classifier_free_guidance=True)
    torch.testing.assert_close(c.encoder_hidden_states, expected)
    torch.testing.assert_close(cond.unconditional(3).encoder_hidden_states, negative)  # "" is SD's unconditional
    assert len(c) == 3 and torch.equal(c[[0]].encoder_hidden_states, c[[2]].encoder_hidden_states)


def test_rows_concatenate_and_repeat():
    a = Conditioning(torch.zeros(2, 3, 4), {"text_embeds": torch.zeros(2, 5), "time_ids": torch.zeros(2, 6)})
    b = Conditioning(torch.ones(1, 3, 4), {"text_embeds": torch.ones(1, 5), "time_ids": torch.ones(1, 6)})
    both = Conditioning.cat([a, b])
    assert len(both) == 3 and both.added_cond_kwargs["time_ids"].shape == (3, 6)
    assert torch.equal(both[[2]].added_cond_kwargs["text_embeds"], b.added_cond_kwargs["text_embeds"])
    assert len(b.repeat(4)) == 4 and set(both.denoiser_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}
