import re

import numpy as np
import pytest

from erasure.toy import world
from erasure.toy.tokenizer import build_tokenizer_files, load_tokenizer


def test_render_is_deterministic_and_well_formed():
    a = world.render(world.Scene("star", "red", "dotted"), np.random.default_rng(3))
    b = world.render(world.Scene("star", "red", "dotted"), np.random.default_rng(3))
    c = world.render(world.Scene("star", "red", "dotted"), np.random.default_rng(4))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_colour_and_style_change_pixels_as_named():
    rng = np.random.default_rng(0)
    red = world.render(world.Scene("square", "red", "solid"), rng).astype(int)
    ink = red[(red[..., 0] - red[..., 1]) > 100]  # strongly red pixels
    assert len(ink) > 300
    solid = world.render(world.Scene("circle", "blue", "solid"), np.random.default_rng(1))
    hollow = world.render(world.Scene("circle", "blue", "outlined"), np.random.default_rng(1))
    blue_px = lambda im: int(((im[..., 2].astype(int) - im[..., 0]) > 100).sum())  # noqa: E731
    assert blue_px(hollow) < 0.6 * blue_px(solid)


def test_unknown_concept_is_refused():
    with pytest.raises(ValueError, match="unknown shape"):
        world.Scene("hexagon", "red")


def _matches(prompt, templates):
    prompt = re.sub(r"\ban ", "a ", prompt)
    return any(re.fullmatch(re.escape(t).replace(re.escape("{obj}"), ".+"), prompt) for t in templates)


def test_prompts_name_the_scene_and_splits_do_not_overlap():
    rng = np.random.default_rng(0)
    assert not set(world.TRAIN_TEMPLATES) & set(world.HELDOUT_TEMPLATES)
    for split, templates in world.TEMPLATE_SPLITS.items():
        other = world.HELDOUT_TEMPLATES if split == "train" else world.TRAIN_TEMPLATES
        for _ in range(200):
            scene = world.random_scene(rng)
            prompt = world.prompt_for(scene, rng, split)
            assert any(w in prompt for w in world.SYNONYMS[scene.shape])
            assert any(w in prompt for w in world.SYNONYMS[scene.color])
            if scene.style != "solid":
                assert any(w in prompt for w in world.SYNONYMS[scene.style])
            assert _matches(prompt, templates) and not _matches(prompt, [t for t in other if t not in ("{obj}", "a {obj}")])


def test_every_toy_word_is_one_token(tmp_path):
    tok = load_tokenizer(build_tokenizer_files(tmp_path))
    for word in world.vocabulary():
        assert len(tok.tokenize(word)) == 1, word
    # Words outside the vocabulary still tokenize (into letters), never into the unknown token alone.
    assert "z" in tok.tokenize("zebra")[0]
