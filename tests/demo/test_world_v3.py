"""World v3's levers (issue 28), prepared as options that are off by default.

Guards: the default world is still world v2 draw for draw (build 5 was trained on it); coarse looks keep what makes
an individual itself at the UNet's 16x16 scale; look words say only what a toy has, each one token; the look code is
a fixed, smooth map whose rows replace only the code word's input embeddings; concept sets and the evaluation's
world follow the build's options.
"""

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from studio.demo import world
from studio.demo.concept_sets import individual_spec, load_concept_set, write_concept_set
from studio.demo.evaluate import DemoWorld
from studio.demo.look_code import LookCode, input_rows_replaced, look_features
from studio.demo.tokenizer import build_clip_tokenizer
from studio.demo.vocab import demo_words

V3 = world.WorldOptions(looks="coarse", look_words=1.0, look_code=0.5)


def _world_digest(**kwargs) -> str:
    rng, sha = random.Random(11), hashlib.sha256()
    for i in range(300):
        scene = world.sample_scene(rng, training=True, unnamed_rate=0.1, toy_rate=0.35)
        sha.update(world.caption(scene, rng, **kwargs).encode())
        if i < 30:
            sha.update(np.asarray(world.render(scene)).tobytes())
    return sha.hexdigest()[:16]


def test_the_default_world_is_world_v2_draw_for_draw():
    """The digest was taken with world v2's module (before the levers existed): scenes, captions and pictures."""
    assert world.WorldOptions() == world.WORLD_V2
    assert _world_digest() == _world_digest(options=world.WORLD_V2) == "589b4c5262204ddb"
    assert all(isinstance(r, range) for r in (world.TRAINING_INDIVIDUALS, world.BUNDLED_INDIVIDUALS,
                                              world.HELD_OUT_INDIVIDUALS, world.NAMED_INDIVIDUALS))
    assert not set(world.LOOK_WORDS) & set(demo_words()) and world.LOOK_CODE_WORD not in demo_words()
    with pytest.raises(ValueError, match="looks must be one of"):
        world.WorldOptions(looks="sharp")
    with pytest.raises(ValueError, match="between 0 and 1"):
        world.WorldOptions(look_code=1.5)


def _object_mask(obj: world.Obj) -> np.ndarray:
    """The object's inside, 4 px away from its outline: where renders on white and on black agree, eroded."""
    on_white, on_black = (np.asarray(world.render(world.Scene([obj], bg, "flat")), float) for bg in ("white", "black"))
    mask = Image.fromarray(((on_white == on_black).all(-1) * 255).astype(np.uint8))
    return np.asarray(mask.filter(ImageFilter.MinFilter(9))) > 0


def _at_latent_scale(picture: Image.Image) -> np.ndarray:
    """What a 16x16 grid keeps of a 64 px picture (box-averaged, then back to 64 px)."""
    return np.asarray(picture.resize((16, 16), Image.BOX).resize((64, 64), Image.BILINEAR), float)


def test_coarse_looks_keep_their_surface_at_the_latent_scale_and_stay_distinct():
    """World v2's stripes and spots are 2-5 px and mostly vanish on a 16x16 grid; a coarse look's regions and marks
    keep most of the surface's colour variation there, and two coarse toys of one main colour still differ."""
    kept = {}
    for looks in world.LOOKS:
        shares = []
        for seed in world.HELD_OUT_INDIVIDUALS[:30]:
            obj = world.individual(seed, "big", "center", looks)
            picture, mask = world.render(world.Scene([obj], "white", "flat")), _object_mask(obj)
            surface = np.asarray(picture, float)[mask]
            shares.append(_at_latent_scale(picture)[mask].std(0).mean() / max(1.0, surface.std(0).mean()))
        kept[looks] = float(np.mean(shares))
    assert kept["coarse"] > 0.7 and kept["coarse"] > kept["fine"] + 0.1, kept
    grid = {s: np.asarray(world.render(world.Scene([world.individual(s, looks="coarse")], "white", "flat"))
                          .resize((16, 16), Image.BOX), float) for s in world.HELD_OUT_INDIVIDUALS[:40]}
    same_colour = [np.abs(grid[a] - grid[b]).mean() for a in grid for b in grid
                   if a < b and world.individual_look(a, "coarse").color == world.individual_look(b, "coarse").color]
    assert len(same_colour) > 20 and min(same_colour) > 4.0


def test_a_coarse_look_is_its_seeds_and_renders_as_concept_json_says(tmp_path):
    """Coarse looks come from their own seed stream (not v2's), have three different colours, and a world v3 set's
    concept.json redraws its pictures bit for bit, with its best plain words saying all the look words can."""
    seed = 2_000_123
    look = world.individual_look(seed, "coarse")
    assert look == world.individual_look(seed, "coarse") and look != world.individual_look(seed)
    assert len({look.color, look.second, look.mark}) == 3 and look.texture in world.REGIONS
    folder = write_concept_set(individual_spec(seed, options=V3), tmp_path)
    cs = load_concept_set(folder)
    assert cs.best_prompt == f"a {world.look_subject(look, describe=True)}" and cs.plain_subject in cs.best_prompt
    assert cs.look == json.loads(json.dumps(dataclasses.asdict(look)))
    for picture, path in zip(cs.pictures, cs.images):
        (obj,) = picture["scene"]["objects"]
        assert obj["looks"] == "coarse"
        drawn = world.render(world.Scene([world.Obj(**obj)], picture["scene"]["background"], picture["scene"]["style"]))
        assert np.array_equal(np.asarray(drawn), np.asarray(Image.open(path).convert("RGB")))
    v2 = individual_spec(seed)  # world v2's set of the same individual: as before the levers
    assert v2.best_prompt == f"a {world.individual_look(seed).color} toy" and v2.looks == "fine"


def test_look_words_say_only_what_the_toy_has_and_are_one_token_each(tmp_path):
    rng, described = random.Random(4), 0
    for _ in range(400):
        scene = world.sample_scene(rng, toy_rate=1.0, looks="coarse")
        text = world.caption(scene, rng, V3)
        full = set().union(*(world.look_subject(world.individual_look(o.individual, "coarse"), True).split()
                             for o in scene.objects))
        said = set(text.split()) & (set(world.LOOK_WORDS) | set(world.COLORS))
        assert said <= full, (text, full)
        described += bool(set(text.split()) & set(world.LOOK_WORDS))
        if len(scene.objects) == 1:
            assert " and a " not in text  # the separator of two objects' descriptions stays unambiguous
    assert described > 200
    words = demo_words(options=V3)
    assert set(world.LOOK_WORDS) | {world.LOOK_CODE_WORD} <= set(words)
    tokenizer = build_clip_tokenizer(words, tmp_path)
    assert {w: tokenizer.tokenize(w) for w in words if len(tokenizer.tokenize(w)) != 1} == {}
    subject = world.look_subject(world.individual_look(2_000_001, "coarse"), describe=True)
    assert len(tokenizer.tokenize(f"a photo of a {subject}")) == len(f"a photo of a {subject}".split())


def test_coded_captions_name_the_toys_their_code_word_stands_for():
    rng = random.Random(8)
    coded_toys = 0
    for _ in range(300):
        scene = world.sample_scene(rng, toy_rate=0.7)
        text, coded = world.coded_caption(scene, rng, world.WorldOptions(look_code=0.5))
        assert text.split().count(world.LOOK_CODE_WORD) == len(coded)
        assert coded == [o.individual for o in scene.objects if o.individual in coded]  # in the caption's order
        coded_toys += len(coded)
    assert coded_toys > 60


def _code() -> LookCode:
    return LookCode.fit("coarse", center=torch.linspace(-1, 1, 128), scale=2.0)


def test_the_look_code_is_fixed_and_smooth():
    """The same map every time (and after a JSON round trip); a small change of a look moves its code a little, a
    different individual moves it far; the codes spread around the centre by about `scale`."""
    code, again = _code(), LookCode.from_json(json.loads(json.dumps(_code().to_json())))
    seeds = list(world.HELD_OUT_INDIVIDUALS[:200])
    codes = code.codes(seeds)
    assert torch.allclose(codes, again.codes(seeds)) and codes.shape == (200, 128)
    spread = float((codes - code.center).pow(2).sum(1).mean().sqrt())
    assert 0.7 * code.scale < spread < 1.3 * code.scale
    look = world.individual_look(seeds[0], "coarse")
    (a1, p1), rest = look.harmonics[0], look.harmonics[1:]
    nudged = [dataclasses.replace(look, angle=look.angle + 0.05),
              dataclasses.replace(look, param=look.param + 0.02),
              dataclasses.replace(look, harmonics=((a1 + 0.01, p1 + 0.05), *rest))]
    near = (code.from_normalised(code.normalised(nudged)) - codes[0]).norm(dim=1)
    far = (codes[1:] - codes[0]).norm(dim=1)
    assert float(near.max()) < 0.2 * float(far.median())
    assert look_features(look).shape == code.feature_mean.shape


def test_code_rows_replace_only_the_code_word_and_get_no_gradient(tmp_path):
    from studio.demo.build import make_text_encoder

    tokenizer = build_clip_tokenizer(demo_words(options=V3), tmp_path)
    encoder = make_text_encoder(tokenizer)
    ids = tokenizer(["a red lookcode on the left", "a lookcode and a lookcode"], padding="max_length",
                    max_length=77, return_tensors="pt").input_ids
    word = tokenizer.convert_tokens_to_ids(f"{world.LOOK_CODE_WORD}</w>")
    where = ids == word
    rows = _code().codes([2_000_001, 2_000_002, 2_000_003])
    seen = {}
    with input_rows_replaced(encoder, where, rows):  # a hook registered after the block's sees what it made
        probe = encoder.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.update(out=out))
        encoder(ids).last_hidden_state.sum().backward()
        probe.remove()
    table = encoder.get_input_embeddings().weight
    assert torch.equal(seen["out"][where], rows)  # the k-th code word of a caption takes the k-th row
    assert torch.equal(seen["out"][~where], table[ids[~where]].detach())
    assert float(table.grad[word].abs().sum()) == 0.0 and float(table.grad.abs().sum()) > 0.0
    assert not encoder.get_input_embeddings()._forward_hooks  # the hook is gone after the block


def test_the_evaluation_world_follows_the_build(tmp_path):
    """`DemoWorld.for_model` reads the build's options: held-out sets in its looks with its best plain words;
    a build from before world v3 (or no build folder) is world v2."""
    assert DemoWorld.for_model(None).options == world.WORLD_V2
    (tmp_path / "training_log.json").write_text(json.dumps({"world": 2}))
    assert DemoWorld.for_model(tmp_path).options == world.WORLD_V2
    (tmp_path / "training_log.json").write_text(json.dumps({"world": 3, "world_options": dataclasses.asdict(V3)}))
    demo = DemoWorld.for_model(tmp_path)
    assert demo.options == V3
    (cs,) = demo.held_out_sets(1, seed=5, folder=tmp_path / "held-out").values()
    look = world.individual_look(cs.individual, "coarse")
    assert cs.plain_subject == world.look_subject(look, describe=True)
    assert all(p["scene"]["objects"][0]["looks"] == "coarse" for p in cs.pictures)
