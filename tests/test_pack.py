"""Concept packs: delta contents, composition, and every way a pack must be refused before it touches a model."""

import datetime as dt
import shutil

import pytest
import torch

from erasure.compose import Composer, shared_copy
from erasure.config import ESDConfig
from erasure.errors import PackIntegrityError, PackMismatchError
from erasure.pack import ConceptPack, Manifest, fingerprint, write_pack
from erasure.trainer import ESDTrainer

TINY = dict(iterations=4, lr=1e-3, ddim_steps=4, pool_trajectories=1, batch_size=2, refresh_every=2)


def fields(name, unet, names, **kw):
    return dict(name=name, concepts=["circle"], method="esd-x", eta=1.0, iterations=1, lr=1e-5, seed=0,
                sample_with="trained", guidance=3.0, ddim_steps=4, loop="pooled",
                base=dict(id="test", fingerprint=fingerprint(dict(unet.named_parameters()), names)),
                created_at=dt.datetime.now(dt.timezone.utc), tool_version="test", **kw)


def make_pack(path, unet, delta, name="p"):
    from PIL import Image

    write_pack(path, fields(name, unet, list(delta)), delta, "# card\n", Image.new("RGB", (8, 8)))
    return path


@pytest.fixture()
def trained(random_pipe):
    trainer = ESDTrainer(random_pipe, ESDConfig(concepts=["circle"], method="esd-x", **TINY), progress=False)
    trainer.train()
    return trainer


def snapshot(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def test_delta_holds_only_touched_tensors_and_reproduces_the_finetune(trained, tmp_path, random_pipe):
    delta = trained.delta()
    assert list(delta) == trained.names
    assert all(v.abs().max() > 0 for v in delta.values())  # every selected tensor actually moved
    tuned = snapshot(trained.unet)
    # Untouched tensors were never modified by training.
    for n, p in trained.frozen.named_parameters():
        if n not in delta:
            assert torch.equal(p, tuned[n])
    # The frozen copy is the base: applying the pack to it must give the fine-tuned weights.
    base = trained.frozen
    pack = ConceptPack.load(make_pack(tmp_path / "circle", base, delta, "circle"))
    before = snapshot(base)
    composer = Composer(base)
    composer.apply([(pack, 1.0)])
    for n, p in base.named_parameters():
        torch.testing.assert_close(p, tuned[n], rtol=0, atol=1e-6)
    composer.restore()
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n  # restore is exact: computed from pristine copies, not subtracted


def test_packs_compose_additively_and_shared_copy_leaves_the_base_alone(random_pipe, tmp_path):
    unet = random_pipe.unet
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    other = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    p = dict(unet.named_parameters())
    a = ConceptPack.load(make_pack(tmp_path / "a", unet, {name: torch.full_like(p[name], 0.5)}, "a"))
    b = ConceptPack.load(make_pack(tmp_path / "b", unet, {name: torch.full_like(p[name], 0.25),
                                                          other: torch.ones_like(p[other])}, "b"))
    base = snapshot(unet)
    variant = shared_copy(unet, [(a, 1.0), (b, 2.0)])
    v = dict(variant.named_parameters())
    torch.testing.assert_close(v[name], base[name] + 0.5 + 0.5, rtol=0, atol=1e-6)
    torch.testing.assert_close(v[other], base[other] + 2.0, rtol=0, atol=1e-6)
    assert v["conv_in.weight"] is p["conv_in.weight"]  # untouched tensors are shared, not copied
    assert all(torch.equal(t, base[n]) for n, t in unet.named_parameters())


@pytest.fixture()
def good_pack(random_pipe, tmp_path):
    unet = random_pipe.unet
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    delta = {name: torch.randn_like(dict(unet.named_parameters())[name]) * 1e-3}
    return make_pack(tmp_path / "good", unet, delta)


def refuse(pack_dir, unet, error, match):
    before = snapshot(unet)
    with pytest.raises(error, match=match):
        Composer(unet).apply([(ConceptPack.load(pack_dir), 1.0)])
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())  # model untouched


def test_good_pack_applies(good_pack, random_pipe):
    Composer(random_pipe.unet).apply([(ConceptPack.load(good_pack), 1.0)])


def test_refused_on_a_base_whose_touched_tensors_differ(good_pack, tmp_path):
    from conftest import make_random_toy_pipe

    other = make_random_toy_pipe(tmp_path / "other", seed=1).unet
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
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight"
    t = torch.zeros_like(dict(unet.named_parameters())[name])
    t[0, 0] = bad
    refuse(make_pack(tmp_path / "nan", unet, {name: t}), unet, PackIntegrityError, "NaN or Inf")


def test_refused_with_an_unexpected_tensor_name(random_pipe, tmp_path):
    unet = random_pipe.unet
    delta = {"up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_z.weight": torch.zeros(4, 4)}
    with pytest.raises(KeyError):  # cannot even fingerprint it on this base
        make_pack(tmp_path / "x", unet, delta)
    manifest_fields = fields("x", unet, [])
    from PIL import Image

    write_pack(tmp_path / "x", manifest_fields, delta, "# card\n", Image.new("RGB", (4, 4)))
    refuse(tmp_path / "x", unet, PackMismatchError, "base has no tensor")


def test_refused_with_a_wrong_shape(random_pipe, tmp_path):
    unet = random_pipe.unet
    name = "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    from PIL import Image

    write_pack(tmp_path / "s", fields("s", unet, [name]), {name: torch.zeros(3, 3)}, "# c\n", Image.new("RGB", (4, 4)))
    refuse(tmp_path / "s", unet, PackMismatchError, "in the base")


def test_refused_when_manifest_lies_about_shapes(good_pack, random_pipe):
    m = Manifest.model_validate_json((good_pack / "pack.json").read_text())
    name = next(iter(m.tensors))
    m.tensors[name].shape = [1, 2]
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
    from erasure.pack import sha256_file

    m = Manifest.model_validate_json((good_pack / "pack.json").read_text())
    m.files["delta.safetensors"] = sha256_file(good_pack / "delta.safetensors")
    (good_pack / "pack.json").write_text(m.model_dump_json())
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "not a readable safetensors")


def test_missing_or_unexpected_files(good_pack, random_pipe, tmp_path):
    (good_pack / "notes.txt").write_text("hi")
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "unexpected file")
    (good_pack / "notes.txt").unlink()
    (good_pack / "preview.png").unlink()
    refuse(good_pack, random_pipe.unet, PackIntegrityError, "preview.png is missing")
    shutil.rmtree(good_pack)
    with pytest.raises(PackIntegrityError, match="no such pack"):
        ConceptPack.load(good_pack)


def test_the_same_delta_writes_the_same_bytes_readable_by_all(random_pipe, tmp_path):
    # Registry dedup and lock files rely on identical deltas hashing identically.
    unet = random_pipe.unet
    params = dict(unet.named_parameters())
    names = [n for n in params if "attn2" in n][:6]
    delta = {n: torch.randn_like(params[n]) for n in names}
    digests = []
    for i in range(3):
        out = make_pack(tmp_path / f"p{i}", unet, delta)
        digests.append(Manifest.model_validate_json((out / "pack.json").read_text()).files["delta.safetensors"])
        assert all((out / f).stat().st_mode & 0o777 == 0o644 for f in ("delta.safetensors", "pack.json"))
    assert len(set(digests)) == 1
