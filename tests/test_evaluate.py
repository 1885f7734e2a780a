"""The erasure table: base vs erased per concept, and the 'apart' figure that leaves the erased concept's images out."""

from erasure.toy.evaluate import EvalReport, Sample, comparison, tally
from erasure.toy.world import Scene


def report(scenes, read):
    """An EvalReport for one 'train' split whose oracle read ``read`` (a list of (shape, colour, style))."""
    samples = [Sample(scene, "prompt", i) for i, scene in enumerate(scenes)]
    labels = {attr: [r[i] for r in read] for i, attr in enumerate(("shape", "color", "style"))}
    out = EvalReport(splits={"train": tally(samples, labels)}, settings={})
    out.samples["train"], out.labels["train"] = samples, labels
    return out


def test_apart_leaves_out_images_of_the_erased_concept():
    scenes = [Scene("square", "red", "outlined"), Scene("circle", "red", "outlined"),
              Scene("circle", "blue", "outlined"), Scene("square", "blue", "solid")]
    truth = [(s.shape, s.color, s.style) for s in scenes]
    base = report(scenes, truth)
    # erasing square: both squares become crosses, and the outlined square also loses its outline
    erased = report(scenes, [("cross", "red", "solid"), truth[1], truth[2], ("cross", "blue", "solid")])
    table = comparison(base, erased, ["square"])["splits"]["train"]["concepts"]
    assert table["square"]["erased"] == 0.0 and "apart" not in table["square"]
    outlined = table["outlined"]
    assert (outlined["base"], outlined["erased"], outlined["n"]) == (1.0, 2 / 3, 3)
    assert outlined["apart"] == {"base": 1.0, "erased": 1.0, "n": 2}  # only the circles: the square is left out
    assert table["red"]["apart"]["n"] == 1 and table["solid"]["apart"]["n"] == 0


def test_drawn_instead_counts_the_erased_concept_on_its_siblings_prompts():
    """A red pack that paints yellow circles red: the erasure table says so, next to the base's rate."""
    scenes = [Scene("circle", "yellow", "solid"), Scene("circle", "yellow", "solid"), Scene("star", "blue", "solid"),
              Scene("star", "red", "solid")]
    truth = [(s.shape, s.color, s.style) for s in scenes]
    base = report(scenes, truth)
    erased = report(scenes, [("circle", "red", "solid"), truth[1], truth[2], ("star", "green", "solid")])
    drawn = comparison(base, erased, ["red"])["splits"]["train"]["drawn_instead"]["red"]
    assert (drawn["base"], drawn["erased"], drawn["n"]) == (0.0, 1 / 3, 3)  # the red star's own image is left out
    assert drawn["worst"] == {"concept": "yellow", "base": 0.0, "erased": 0.5, "n": 2}
