"""Writes that never destroy (issue 23, item 3): every command that writes a named output checks it before any work.

An existing output is refused with one line and exit 2, and left as it was, unless `--overwrite`; a folder is
replaced only if the studio wrote it (a DreamBooth model folder holds `studio_training.json`), and then whole; a plain
file where a folder goes is refused before training. Refusals that must come before the model loads are run with a
`--model` that does not exist: had the command got as far as loading, it would say so instead.
Runs that train use the demo model for one to three steps (a later `--steps` on a command line wins).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from studio.cli import main
from studio.engine.learned.registry import load_concept, save_concept
from studio.engine.learned.word import Concept

REPO = Path(__file__).resolve().parents[1]
PICTURES = REPO / "assets" / "concepts" / "toy-ladybug"
TRAIN = ("train", "--images", PICTURES, "--token", "<lb>", "--init", "toy", "--steps", "2", "--batch", "1",
         "--no-stop-when-learned")


def studio(capsys, *args) -> tuple[int, str, str]:
    """Run `studio ARGS` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    said = capsys.readouterr()
    return code, said.out, said.err.strip()


def tree(path: Path) -> dict[str, bytes | None]:
    """Every file under `path` (or `path` itself) with its bytes; folders as None: what "left as it was" compares."""
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def refused(code: int, err: str, *names: str) -> bool:
    """Exit 2 with one line naming each of `names` and no traceback."""
    return code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err and all(n in err for n in names)


@pytest.mark.parametrize("method", ["ti", "xti", "pivotal", "lora"])
def test_an_existing_out_file_is_refused_before_the_model_loads_and_left_as_it_was(tmp_path, capsys, method):
    """Guards `--out existing.safetensors` being replaced silently after training."""
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"someone's file")
    code, _, err = studio(capsys, *TRAIN, "--method", method, "--model", tmp_path / "no-model", "--out", out)
    assert refused(code, err, str(out), "already exists", "--overwrite"), err
    assert out.read_bytes() == b"someone's file"


def test_overwrite_replaces_an_existing_out_file(tmp_path, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"someone's file")
    code, _, err = studio(capsys, *TRAIN, "--out", out, "--overwrite")
    assert code == 0, err
    assert load_concept(out).token == "<lb>"


def test_dreambooth_never_replaces_a_folder_the_studio_did_not_write(tmp_path, capsys):
    """Guards `--method dreambooth --out DIR` deleting an unrelated folder's files (exit 0): refused before the
    model loads, and with --overwrite too, since the studio did not write that folder."""
    folder = tmp_path / "holiday"
    (folder / "day1").mkdir(parents=True)
    (folder / "day1" / "beach.jpg").write_bytes(b"a picture")
    (folder / "notes.txt").write_text("mine")
    before = tree(folder)
    for extra, why in (((), "already exists"), (("--overwrite",), "studio did not write")):
        code, _, err = studio(capsys, *TRAIN, "--method", "dreambooth", "--model", tmp_path / "no-model",
                              "--out", folder, *extra)
        assert refused(code, err, str(folder), why), err
        assert tree(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holiday"]  # no temp folder or sidecar left beside it


def test_a_plain_file_where_a_folder_goes_is_refused_before_training(tmp_path, capsys):
    """Guards `--out` naming a plain file: it trained every step, then failed with a FileExistsError traceback."""
    notes = tmp_path / "notes"
    notes.write_text("mine")
    for method, out in (("ti", notes), ("dreambooth", notes), ("ti", notes / "x.safetensors"),
                        ("dreambooth", notes / "model")):
        code, _, err = studio(capsys, *TRAIN, "--method", method, "--model", tmp_path / "no-model", "--out", out,
                              "--overwrite")
        assert refused(code, err, f"{notes} is a file"), (method, out, err)
    assert notes.read_text() == "mine"


def test_a_studio_model_folder_is_kept_then_replaced_whole_with_overwrite(tmp_path, capsys):
    models = tmp_path / "models"
    out = models / "lb"
    code, _, err = studio(capsys, *TRAIN, "--method", "dreambooth", "--steps", "1", "--out", out)
    assert code == 0, err
    assert json.loads((out / "studio_training.json").read_text())["steps"] == "1"
    first = tree(out)

    code, _, err = studio(capsys, *TRAIN, "--method", "dreambooth", "--model", tmp_path / "no-model", "--out", out)
    assert refused(code, err, str(out), "--overwrite"), err
    assert tree(out) == first

    code, _, err = studio(capsys, *TRAIN, "--method", "dreambooth", "--out", out, "--overwrite")
    assert code == 0, err
    assert json.loads((out / "studio_training.json").read_text())["steps"] == "2"
    assert (out / "model_index.json").is_file()
    assert sorted(p.name for p in models.iterdir()) == ["lb", "lb.trainstate"]  # the old folder is gone, no temp


def test_a_folder_out_keeps_its_files_refuses_an_earlier_run_and_resume_continues_in_place(tmp_path, capsys):
    """`--out FOLDER` (ti): an existing folder is fine, the final file in it is not (the message offers --resume),
    and `--resume` continues the run, replacing its own files."""
    folder = tmp_path / "concepts"
    folder.mkdir()
    (folder / "other.safetensors").write_bytes(b"another word")
    code, _, err = studio(capsys, *TRAIN, "--save-every", "1", "--out", folder)
    assert code == 0, err
    assert (folder / "other.safetensors").read_bytes() == b"another word"
    done = tree(folder)

    code, _, err = studio(capsys, *TRAIN, "--save-every", "1", "--model", tmp_path / "no-model", "--out", folder)
    assert refused(code, err, str(folder / "lb.safetensors"), "--resume", "--overwrite"), err
    assert tree(folder) == done

    code, said, err = studio(capsys, *TRAIN, "--steps", "3", "--save-every", "1", "--resume", folder, "--out", folder)
    assert code == 0, err
    assert "resumed from lb.safetensors at step 2" in said
    assert load_concept(folder / "lb.safetensors").meta["steps"] == "3"


def test_checkpoints_of_an_earlier_run_are_refused_and_resuming_from_elsewhere_is_not_in_place(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "lb-step1.safetensors").write_bytes(b"an earlier checkpoint")
    code, _, err = studio(capsys, *TRAIN, "--save-every", "1", "--model", tmp_path / "no-model", "--out", folder)
    assert refused(code, err, str(folder / "lb-step1.safetensors"), "--overwrite"), err
    assert (folder / "lb-step1.safetensors").read_bytes() == b"an earlier checkpoint"

    elsewhere = tmp_path / "elsewhere"
    code, _, err = studio(capsys, *TRAIN, "--steps", "1", "--out", elsewhere)
    assert code == 0, err
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"mine")
    code, _, err = studio(capsys, *TRAIN, "--steps", "3", "--resume", elsewhere / "lb.safetensors",
                          "--model", tmp_path / "no-model", "--out", target)
    assert refused(code, err, str(target)), err
    assert target.read_bytes() == b"mine"


def test_a_lora_beside_a_words_file_it_would_be_read_with_is_refused_before_training(tmp_path, capsys):
    """Guards a DreamBooth-LoRA run that trained, then failed in export: `x_emb.safetensors` would be its words."""
    words = tmp_path / "x_emb.safetensors"
    words.write_bytes(b"words of another LoRA")
    code, _, err = studio(capsys, *TRAIN, "--method", "lora", "--model", tmp_path / "no-model", "--out",
                          tmp_path / "x.safetensors", "--overwrite")
    assert refused(code, err, "x_emb.safetensors", "would be read"), err
    assert words.read_bytes() == b"words of another LoRA"


def test_convert_keeps_an_existing_out_and_the_second_file_of_a_pair(tmp_path, capsys):
    sd1 = save_concept(Concept("<cat>", {"text_encoder": torch.randn(1, 768)}, {}), tmp_path / "cat.safetensors")
    out = tmp_path / "cat.pt"
    out.write_bytes(b"mine")
    code, _, err = studio(capsys, "concepts", "convert", sd1, "--to", "a1111", out)
    assert refused(code, err, str(out), "--overwrite"), err
    assert out.read_bytes() == b"mine"
    code, _, err = studio(capsys, "concepts", "convert", sd1, "--to", "a1111", out, "--overwrite")
    assert code == 0, err
    assert load_concept(out).token == "<cat>"

    # SDXL in diffusers' form is a pair, x.safetensors and x_2.safetensors: the second is checked too.
    sdxl = save_concept(Concept("<dog>", {"text_encoder": torch.randn(1, 768), "text_encoder_2": torch.randn(1, 1280)},
                                {}), tmp_path / "dog.safetensors")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "x_2.safetensors").write_bytes(b"mine too")
    code, _, err = studio(capsys, "concepts", "convert", sdxl, "--to", "diffusers", folder / "x.safetensors")
    assert refused(code, err, str(folder / "x_2.safetensors"), "--overwrite"), err
    assert tree(folder) == {"x_2.safetensors": b"mine too"}  # nothing written, no staging folder left
    code, _, err = studio(capsys, "concepts", "convert", sdxl, "--to", "diffusers", folder / "x.safetensors",
                          "--overwrite")
    assert code == 0, err
    assert sorted(tree(folder)) == ["x.safetensors", "x_2.safetensors"]
    assert (folder / "x_2.safetensors").read_bytes() != b"mine too"


def test_export_refuses_a_folder_or_a_file_above_its_out_in_one_line(tmp_path, capsys):
    lora = tmp_path / "l.safetensors"
    code, _, err = studio(capsys, *TRAIN, "--method", "lora", "--steps", "1", "--rank", "1", "--out", lora)
    assert code == 0, err
    folder = tmp_path / "exports.safetensors"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    notes = tmp_path / "notes"
    notes.write_text("mine")
    for out, why in ((folder, f"{folder} is a folder"), (notes / "x.safetensors", f"{notes} is a file")):
        code, _, err = studio(capsys, "concepts", "export", lora, "--format", "kohya", "--out", out, "--overwrite")
        assert refused(code, err, why), err
    assert tree(folder) == {"keep.txt": b"mine"} and notes.read_text() == "mine"


def test_generate_and_eval_keep_existing_outputs_before_loading_anything(tmp_path, capsys):
    picture = tmp_path / "pic-2.png"
    picture.write_bytes(b"not mine to lose")
    code, _, err = studio(capsys, "generate", "--prompt", "a cat", "--batch", "2", "--model", tmp_path / "no-model",
                          "--out", tmp_path / "pic.png")
    assert refused(code, err, str(picture), "--overwrite"), err
    results = tmp_path / "results.json"
    results.write_text("{}")
    code, _, err = studio(capsys, "eval", "--quick", "--skip-compliance", "--model", tmp_path / "no-model",
                          "--out", results)
    assert refused(code, err, str(results), "--overwrite"), err
    assert picture.read_bytes() == b"not mine to lose" and results.read_text() == "{}"


def test_replace_folder_swaps_a_studio_folder_whole_and_overwrite_keeps_other_folders(tmp_path):
    from studio.engine.files import OutputError, check_new_output, replace_folder

    old, new = tmp_path / "model", tmp_path / ".model.new.tmp"
    old.mkdir()
    (old / "studio_training.json").write_text("old")
    (old / "unet.bin").write_text("old weights")
    new.mkdir()
    (new / "studio_training.json").write_text("new")
    check_new_output(old, overwrite=True, folder=True, marker="studio_training.json")
    replace_folder(new, old)
    assert tree(old) == {"studio_training.json": b"new"} and sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    (tmp_path / "empty").mkdir()
    check_new_output(tmp_path / "empty", overwrite=True, folder=True, marker="studio_training.json")  # loses nothing
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        check_new_output(tmp_path / "theirs", overwrite=True, folder=True, marker="studio_training.json")
