"""Concept packs: the format (save/load, format-1 migration), composition, and every way a pack must be refused
before it touches a model."""

import json
import shutil

import pytest
import torch

from erasure.errors import PackIntegrityError, PackMismatchError
from erasure.pack.compose import compose_denoiser, with_packs
from erasure.pack.concept_pack import BaseWeights, ConceptPack
from erasure.pack.manifest import FORMAT_VERSION, Manifest
from erasure.training.config import ESDConfig
from erasure.training.trainer import ESDTrainer

from factories import make_pack, random_toy_pipe

TINY = dict(iterations=4, lr=1e-3, ddim_steps=4, pool_trajectories=1, batch_size=2, refresh_every=2)
ATTN_K = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
ATTN_V = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
SHIPPED_V3 = "registry/toy-registry/toy/circle/commits/12f4c5ca38e574ed134610c1305b2fba2124db51"


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def test_delta_reproduces_the_finetune_and_the_base_stays_untouched(random_pipe, tmp_path):
    trainer = ESDTrainer(random_pipe, ESDConfig(concepts=["circle"], method="esd-x", **TINY), progress=False)
    trainer.train()
    delta = trainer.delta()
    assert list(delta) == trainer.names and all(v.abs().max() > 0 for v in delta.values())
    tuned = snapshot(trainer.denoiser)
    base = trainer.frozen  # the base values, sharing every untouched tensor with the trained UNet
    for n, p in base.named_parameters():
        if n not in delta:
            assert torch.equal(p, tuned[n])  # untouched tensors never moved
    pack = make_pack(tmp_path / "circle", base, delta=delta)
    before = snapshot(base)
    composed = compose_denoiser(base, [(ConceptPack.from_pretrained(tmp_path / "circle"), 1.0)])
    for n, p in composed.named_parameters():
        torch.testing.assert_close(p, tuned[n], rtol=0, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    assert pack.training.method == "esd-x"


def test_packs_compose_additively_and_share_untouched_tensors(random_pipe):
    unet = random_pipe.unet
    p = dict(unet.named_parameters())
    a = make_pack(None, unet, "a", delta={ATTN_K: torch.full_like(p[ATTN_K], 0.5)})
    b = make_pack(None, unet, "b", delta={ATTN_K: torch.full_like(p[ATTN_K], 0.25), ATTN_V: torch.ones_like(p[ATTN_V])})
    base = snapshot(unet)
    variant = dict(compose_denoiser(unet, [(a, 1.0), (b, 2.0)]).named_parameters())
    torch.testing.assert_close(variant[ATTN_K], base[ATTN_K] + 0.5 + 0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(variant[ATTN_V], base[ATTN_V] + 2.0, rtol=0, atol=1e-6)
    assert variant["conv_in.weight"] is p["conv_in.weight"]  # untouched tensors are shared, not copied
    assert all(torch.equal(t, base[n]) for n, t in unet.named_parameters())
    erased = with_packs(random_pipe, [(a, 1.0)])
    assert erased.unet is not unet and erased.vae is random_pipe.vae and erased.text_encoder is random_pipe.text_encoder


def test_save_and_load_round_trip_with_the_training_config_verbatim(random_pipe, tmp_path):
    pack = make_pack(tmp_path / "p", random_pipe.unet, "p", concepts=("circle", "red"))
    loaded = ConceptPack.from_pretrained(tmp_path / "p")
    data = json.loads((tmp_path / "p" / "pack.json").read_text())
    assert data["format_version"] == FORMAT_VERSION == 4 and data["guide_away"] == 0.0
    assert data["training"] == pack.training.model_dump(mode="json")  # every option, verbatim
    assert loaded.concepts == ["circle", "red"] and loaded.manifest.tensors == pack.manifest.tensors
    assert all(torch.equal(loaded.delta[n], pack.delta[n]) for n in pack.delta)
    assert loaded.preview == pack.preview
    loaded.save_pretrained(tmp_path / "again")  # identical content writes identical bytes
    for name in ("delta.safetensors", "README.md", "preview.png"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()


def test_the_card_is_a_hub_model_card(random_pipe, tmp_path):
    from huggingface_hub import ModelCard

    make_pack(tmp_path / "p", random_pipe.unet, "p", method="esd-u", base_id="someone/sd-base")
    card = ModelCard.load(tmp_path / "p" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["license"] == "apache-2.0"
    assert data["base_model"] == "someone/sd-base" and {"concept-erasure", "esd", "esd-u"} <= set(data["tags"])
    assert "![base (top) vs erased (bottom)](preview.png)" in card.text


def test_format_1_packs_are_migrated_on_read():
    pack = ConceptPack.from_pretrained(SHIPPED_V3)  # the shipped v3 circle pack, written in format 1
    assert pack.manifest.format_version == 4 and pack.concepts == ["circle"] and pack.guide_away == 0.0
    t = pack.training
    assert (t.method, t.iterations, t.lr, t.templates, t.preserve_weight) == ("esd-x", 200, 1e-4, ["toy"], 10.0)
    assert t.preserve == ["square", "triangle", "star", "cross"] and t.delta_dtype == "float32"


def test_format_2_packs_read_as_format_4_without_guide_away():
    pack = ConceptPack.from_pretrained("toy/circle", revision="v5-attack3")  # published in format 2
    assert json.loads((pack.path / "pack.json").read_text())["format_version"] == 2
    assert pack.manifest.format_version == 4 and pack.guide_away == 0.0


def test_format_3_packs_move_a_methods_own_options_into_method_options(random_pipe, tmp_path):
    shipped = ConceptPack.from_pretrained("toy/circle", revision="v5-away-attack4")  # published in format 3
    on_disk = json.loads((shipped.path / "pack.json").read_text())
    assert on_disk["format_version"] == 3 and shipped.guide_away == 1.0
    assert shipped.training.method_options.model_dump() == {}  # esd-x has no options of its own
    soft = on_disk["redteam"]["config"]["soft_steps"]  # the soft-prompt family's options were flat too
    assert shipped.manifest.redteam.config.options("soft-prompt").soft_steps == soft
    # format 3 held edit_prompts in every config: an esd pack drops it, a uce pack keeps it as its method's option
    make_pack(tmp_path / "p", random_pipe.unet, "p")
    data = json.loads((tmp_path / "p" / "pack.json").read_text())
    training = {k: v for k, v in data["training"].items() if k != "method_options"}

    def read(**changes) -> Manifest:
        return Manifest.from_json(json.dumps({**data, "format_version": 3, "training": {**training, **changes}}))

    assert read(edit_prompts=1000).training.method_options.model_dump() == {}
    assert read(method="uce", anchor=["square"], edit_prompts=200).training.method_options.edit_prompts == 200


def test_other_format_versions_are_refused_in_one_line(random_pipe, tmp_path):
    make_pack(tmp_path / "p", random_pipe.unet, "p")
    data = json.loads((tmp_path / "p" / "pack.json").read_text())
    (tmp_path / "p" / "pack.json").write_text(json.dumps({**data, "format_version": 5}))
    with pytest.raises(PackIntegrityError, match=r"format version 5; this erasure reads formats 1 to 4") as err:
        ConceptPack.from_pretrained(tmp_path / "p")
    assert len(str(err.value).splitlines()) == 1


def test_hub_ids_resolve_through_the_registry_entry_point(toy_pipe):
    pack = ConceptPack.from_pretrained("toy/circle", revision="v3")  # the shipped registry: no HF_ENDPOINT
    assert pack.concepts == ["circle"] and pack.path.name == "12f4c5ca38e574ed134610c1305b2fba2124db51"
    pack.verify_against(toy_pipe.unet)
    with pytest.raises(PackIntegrityError, match="no such pack directory"):
        ConceptPack.from_pretrained("./no/such/dir")


def test_base_weights_fingerprint_each_tensor_set_once(random_pipe, monkeypatch):
    import erasure.pack.concept_pack as pack_module

    unet = random_pipe.unet
    packs = [make_pack(None, unet, f"p{i}", seed=i) for i in range(3)]  # three esd-x packs: one tensor set
    calls = []
    real = pack_module.fingerprint
    monkeypatch.setattr(pack_module, "fingerprint", lambda state, names: calls.append(1) or real(state, names))
    base = BaseWeights(unet)
    for p in packs:
        p.verify_against(base)
    compose_denoiser(base, [(p, 1.0) for p in packs])
    assert len(calls) == 1


@pytest.fixture()
def good_pack(random_pipe, tmp_path):
    unet = random_pipe.unet
    make_pack(tmp_path / "good", unet, delta={ATTN_K: torch.randn_like(dict(unet.named_parameters())[ATTN_K]) * 1e-3})
    return tmp_path / "good"


def refuse(pack_dir, unet, error, match):
    before = snapshot(unet)
    with pytest.raises(error, match=match):
        compose_denoiser(unet, [(ConceptPack.from_pretrained(pack_dir), 1.0)])
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # model untouched


def test_good_pack_applies(good_pack, random_pipe):
    unet = random_pipe.unet
    composed = dict(compose_denoiser(unet, [(ConceptPack.from_pretrained(good_pack), 1.0)]).named_parameters())
    base = dict(unet.named_parameters())
    assert not torch.equal(composed[ATTN_K], base[ATTN_K])
    assert [n for n in base if composed[n] is not base[n]] == [ATTN_K]


def test_refused_on_a_base_whose_touched_tensors_differ(good_pack, tmp_path):
    other = random_toy_pipe(tmp_path / "other", seed=1).unet
    refuse(good_pack, other, PackMismatchError, "built for another base")


def test_refused_with_a_wrong_sha256(good_pack, random_pipe):
    with open(good_pack / "README.md", "a") as f:
        f.write("tampered\n")
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "sha256 of README.md")


def test_refused_when_delta_bytes_are_tampered(good_pack, random_pipe):
    data = bytearray((good_pack / "delta.safetensors").read_bytes())
    data[-3] ^= 0xFF  # same size, different value
    (good_pack / "delta.safetensors").write_bytes(bytes(data))
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "sha256 of delta.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refused_with_non_finite_values(random_pipe, tmp_path, bad):
    unet = random_pipe.unet
    t = torch.zeros_like(dict(unet.named_parameters())[ATTN_V])
    t[0, 0] = bad
    make_pack(tmp_path / "nan", unet, delta={ATTN_V: t})
    refuse(tmp_path / "nan", unet, PackIntegrityError, "NaN or Inf")


def test_refused_with_an_unexpected_tensor_name(random_pipe, tmp_path):
    unet = random_pipe.unet
    make_pack(tmp_path / "x", unet, delta={"up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_z.weight":
                                          torch.zeros(4, 4)})
    refuse(tmp_path / "x", unet, PackMismatchError, "base has no tensor")


def test_refused_with_a_wrong_shape(random_pipe, tmp_path):
    unet = random_pipe.unet
    make_pack(tmp_path / "s", unet, delta={ATTN_K: torch.zeros(3, 3)})
    refuse(tmp_path / "s", unet, PackMismatchError, "in the base")


def test_refused_when_manifest_lies_about_shapes(good_pack, random_pipe):
    m = Manifest.from_json((good_pack / "pack.json").read_text())
    m.tensors[ATTN_K].shape = [1, 2]
    (good_pack / "pack.json").write_text(m.model_dump_json())
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "manifest says")


@pytest.mark.parametrize("filename", ["delta.bin", "model.pt", "extra.pkl"])
def test_refused_given_a_pickle_file(good_pack, random_pipe, filename):
    import pickle

    (good_pack / filename).write_bytes(pickle.dumps({"x": 1}))
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "pickle")


def test_refused_when_delta_is_a_pickle_in_disguise(good_pack, random_pipe):
    torch.save({"x": torch.zeros(1)}, good_pack / "delta.safetensors")  # a torch pickle under the right name
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "sha256 of delta.safetensors")
    # Even with a manifest updated to the new hash it is not read as a pickle.
    from erasure.files import sha256_file

    m = Manifest.from_json((good_pack / "pack.json").read_text())
    m.files["delta.safetensors"] = sha256_file(good_pack / "delta.safetensors")
    (good_pack / "pack.json").write_text(m.model_dump_json())
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "not a readable safetensors")


def test_missing_or_unexpected_files(good_pack, random_pipe):
    (good_pack / "notes.txt").write_text("hi")
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "unexpected file")
    (good_pack / "notes.txt").unlink()
    (good_pack / "preview.png").unlink()
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "preview.png is missing")
    shutil.rmtree(good_pack)
    with pytest.raises(PackIntegrityError, match="no such pack"):
        ConceptPack.from_pretrained(good_pack)


def test_the_same_delta_writes_the_same_bytes_readable_by_all(random_pipe, tmp_path):
    # Registry dedup and lock files rely on identical deltas hashing identically.
    unet = random_pipe.unet
    params = dict(unet.named_parameters())
    delta = {n: torch.randn_like(params[n]) for n in [n for n in params if "attn2" in n][:6]}
    digests = []
    for i in range(3):
        make_pack(tmp_path / f"p{i}", unet, delta=delta)
        digests.append(json.loads((tmp_path / f"p{i}" / "pack.json").read_text())["files"]["delta.safetensors"])
        assert all((tmp_path / f"p{i}" / f).stat().st_mode & 0o777 == 0o644 for f in ("delta.safetensors", "pack.json"))
    assert len(set(digests)) == 1
