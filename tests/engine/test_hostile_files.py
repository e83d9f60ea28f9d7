"""Readers that fail closed, and LoRA checks before use (issue 23, items 4-6).

Guards what a stranger's file did to the studio: a PNG embedding of deeply nested JSON (RecursionError), a PNG whose
header claims 20000x20000 pixels (DecompressionBombError), a 100 GB (sparse) safetensors file, a header claiming
offsets past the file's end and a 1 MB `.pt` that inflates to hundreds of MB ended `studio concepts inspect` and
`studio generate --concept` in tracebacks, or read the whole bomb first; a LoRA with NaN weights drew a black picture
(exit 0); mismatched up/down ranks, a wrong input width and broken adapter metadata ended in peft's tracebacks. Each is
now one line naming the file and the problem, exit 2. Every file is made in the test (tests/hostile_files.py); the
LoRAs are made for the demo model's own UNet layers, and `generate` runs on the demo model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

import hostile_files
from studio.cli import main
from studio.engine.containers import MAX_EMBEDDING_BYTES, failing_closed
from studio.engine.learned.lora import check_lora_layers
from studio.engine.learned.lora_files import MAX_LORA_RANK, load_lora
from studio.engine.learned.registry import load_concept
from studio.engine.learned.word import ConceptError
from studio.errors import LoraError

REPO = Path(__file__).resolve().parents[2]
RANK = 2
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

HOSTILE = {  # file name -> (maker, what the one line says)
    "nested.png": (hostile_files.nested_json_png, "nested 50000 deep"),
    "pixels.png": (hostile_files.pixel_bomb_png, "too many pixels"),
    "huge.safetensors": (hostile_files.sparse_safetensors, "the file is 100.0 GB"),
    "liar.safetensors": (hostile_files.lying_safetensors, "claims bytes 0-107374182400 of 1024"),
    "bomb.pt": (lambda path: hostile_files.zip_bomb_pt(path, megabytes=64), "zip bomb"),
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    return {name: make(folder / name) for name, (make, _) in HOSTILE.items()}


def one_error_line(capsys, command: str, alone: bool = True) -> str:
    """The one error line a CLI command printed (stderr), with no traceback; `alone`: all it printed there (a model
    loaded first prints its progress bars before it)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"studio {command}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert not alone or lines == errors, lines
    return errors[0]


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_inspect_and_generate_refuse_each_hostile_file_in_one_line(hostile, capsys, name):
    path, expected = hostile[name], HOSTILE[name][1]
    with pytest.raises(ConceptError, match=expected):
        load_concept(path)
    assert main(["concepts", "inspect", str(path), "--json"]) == 2
    line = one_error_line(capsys, "concepts")
    assert name in line and expected in line
    # Refused while reading the concepts, before any model is loaded.
    out = str(path.with_suffix(".out.png"))
    assert main(["generate", "--prompt", "a toy", "--concept", str(path), "--out", out]) == 2
    line = one_error_line(capsys, "generate")
    assert name in line and expected in line


def test_the_real_cli_refuses_a_picture_of_nested_json_without_a_traceback(hostile):
    """The RecursionError of the issue, through `python -m studio` as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "studio", "concepts", "inspect", str(hostile["nested.png"]),
                             "--json"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "nested.png" in result.stderr and "nested 50000 deep" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak memory in /proc/self")
def test_a_zip_bomb_is_refused_from_its_directory_without_inflating_it(tmp_path):
    """A 256 MB storage deflated to a few hundred KB: refused as an embedding (over MAX_EMBEDDING_BYTES) and as a LoRA
    (the ratio); the peak memory of the process that reads it grows by far less than the bomb (torch.load inflated
    it whole: +256 MB)."""
    bomb = hostile_files.zip_bomb_pt(tmp_path / "bomb.pt", megabytes=256)
    assert bomb.stat().st_size < 2**20 and 256 * 2**20 > MAX_EMBEDDING_BYTES
    warm = tmp_path / "warm.pt"
    torch.save({"emb_params": torch.randn(1, 128)}, warm)
    # The peak resident memory (VmHWM) is reset after the imports, whose own peak would hide the bomb's.
    script = textwrap.dedent("""
        import re, sys
        from studio.cli import main

        def megabytes(field):
            return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024

        main(["concepts", "inspect", sys.argv[2], "--json"])  # the imports and lazy imports of a real inspect
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: the peak starts again from the memory held now
        before = megabytes("VmRSS")
        codes = [main(["concepts", "inspect", sys.argv[1], "--json"]),
                 main(["generate", "--prompt", "x", "--concept", sys.argv[1]]),
                 main(["generate", "--prompt", "x", "--lora", sys.argv[1]])]
        print(codes, megabytes("VmHWM") - before)
    """)
    result = subprocess.run([sys.executable, "-c", script, str(bomb), str(warm)], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    codes, grown_mb = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert codes == "[2, 2, 2]", result.stderr
    assert int(grown_mb) < 48, f"peak memory grew by {grown_mb} MB reading a 256 MB zip bomb"
    assert result.stderr.count("zip bomb") == 3 and "Traceback" not in result.stderr, result.stderr


def test_any_failure_inside_a_reader_becomes_one_line_naming_the_file(tmp_path):
    """The guard itself: Python's own RecursionError from its JSON parser, and a MemoryError, leave as the reader's
    error, one line with the file and the reason."""
    path = tmp_path / "deep.json"
    with pytest.raises(ConceptError) as caught:
        with failing_closed(path, ConceptError, "concept file"):
            json.loads("[" * 100_000 + "]" * 100_000)
    assert str(caught.value).startswith("deep.json: not a readable concept file (RecursionError")
    assert "\n" not in str(caught.value)
    with pytest.raises(LoraError, match=r"^deep.json: not a readable LoRA file \(MemoryError\)"):
        with failing_closed(path, LoraError, "LoRA file"):
            raise MemoryError


# ---- LoRA checks -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_unet(demo_model_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(demo_model_dir / "unet")


def demo_lora_weights(unet: UNet2DConditionModel, seed: int = 0) -> dict[str, torch.Tensor]:
    """A diffusers/peft-form LoRA on the attention projections of the demo UNet, with small random A and B."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION):
            weights[f"unet.{name}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=generator) * 0.1
            weights[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=generator) * 0.1
    return weights


def first_key(weights: dict[str, torch.Tensor], part: str, layer: str = "attn1.to_q") -> str:
    return next(key for key in weights if f"{layer}.{part}" in key)


def write_lora(path: Path, weights: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(weights, path, metadata)
    return path


def test_a_demo_lora_reads_and_fits_the_demo_unet(tmp_path, demo_unet):
    lora = load_lora(write_lora(tmp_path / "good.safetensors", demo_lora_weights(demo_unet)))
    assert lora.families == ("demo",) and lora.ranks == (RANK,)
    check_lora_layers(lora, demo_unet, "the demo model")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_lora_with_non_finite_weights_is_refused_not_drawn_black(tmp_path, demo_unet, capsys, value):
    weights = demo_lora_weights(demo_unet)
    weights[first_key(weights, "lora_B")][0, 0] = value
    path = write_lora(tmp_path / "diverged.safetensors", weights)
    with pytest.raises(LoraError, match=r"^diverged.safetensors: .*lora_B.* NaN or infinite values"):
        load_lora(path)
    assert main(["generate", "--prompt", "a toy", "--concept", str(path), "--steps", "2",
                 "--out", str(tmp_path / "black.png")]) == 2
    assert "NaN or infinite" in one_error_line(capsys, "generate")
    assert not (tmp_path / "black.png").exists()


def test_pairs_whose_ranks_disagree_or_pass_the_cap_are_refused_on_reading(tmp_path, demo_unet):
    weights = demo_lora_weights(demo_unet)
    up = first_key(weights, "lora_B")
    mismatched = dict(weights, **{up: torch.zeros(weights[up].shape[0], RANK + 1)})
    with pytest.raises(LoraError, match=r"^ranks.safetensors: the pair .*lora_A.* has mismatched ranks "
                                        r"\(down \[2, \d+\], up \[\d+, 3\]"):
        load_lora(write_lora(tmp_path / "ranks.safetensors", mismatched))

    down = first_key(weights, "lora_A")
    rank = MAX_LORA_RANK + 1
    huge = dict(weights, **{down: torch.zeros(rank, weights[down].shape[1]),
                            up: torch.zeros(weights[up].shape[0], rank)})
    with pytest.raises(LoraError, match=f"has rank {rank}; the studio reads ranks 1 to {MAX_LORA_RANK}"):
        load_lora(write_lora(tmp_path / "huge-rank.safetensors", huge))

    orphan = {key: tensor for key, tensor in weights.items() if key != down}
    with pytest.raises(LoraError, match="has no down matrix"):
        load_lora(write_lora(tmp_path / "orphan.safetensors", orphan))


def test_a_pair_of_the_wrong_width_for_the_model_is_refused_before_it_is_loaded(tmp_path, demo_model_dir, capsys,
                                                                               demo_unet):
    """A down matrix 8 wider than the layer's input (an SD1.5 LoRA's self-attention on another model of the same
    cross-attention width reads like this): refused by generate in one line, and the shared UNet keeps no adapter."""
    from studio.engine.generate import GenerateRequest, generate
    from studio.engine.models import ModelManager

    weights = demo_lora_weights(demo_unet)
    down = first_key(weights, "lora_A")
    weights[down] = torch.zeros(RANK, weights[down].shape[1] + 8)
    path = write_lora(tmp_path / "wide.safetensors", weights)
    lora = load_lora(path)  # a file that is consistent on its own
    model = ModelManager().load(str(demo_model_dir))
    request = GenerateRequest("a toy", steps=2, seed=1, preview_every=0, concepts=[(lora, 1.0)])
    with pytest.raises(LoraError, match=r"^wide.safetensors: layer .*attn1.to_q of .* is a linear layer from \d+ to "
                                        r"\d+ features, but the LoRA's pair there is down \[2, \d+\]"):
        generate(model, request)
    assert not getattr(model.pipe.unet, "peft_config", None), "the refused LoRA was loaded into the shared UNet"

    assert main(["generate", "--prompt", "a toy", "--concept", str(path), "--steps", "2",
                 "--out", str(tmp_path / "wide.png")]) == 2
    assert "attn1.to_q" in one_error_line(capsys, "generate", alone=False)


@pytest.mark.parametrize("metadata, expected", [
    ({"unet.r": "four"}, r"unet.r is 'four', not a rank from 1 to 1024"),
    ({"unet.r": 2, "unet.lora_alpha": [1]}, r"unet.lora_alpha is \[1\], not a number"),
    ({"unet.r": 2, "unet.not_a_field": 1}, r"adapter metadata for unet is no LoRA config peft accepts"),
    ({"unet.r": 8}, r"gives unet rank\(s\) \[8\], but its weights have rank\(s\) \[2\]"),
    ({"unet.r": 2, "unet.use_dora": True}, r"says DoRA"),
])
def test_broken_adapter_metadata_is_refused_in_one_line(tmp_path, demo_unet, metadata, expected):
    path = write_lora(tmp_path / "meta.safetensors", demo_lora_weights(demo_unet),
                      {"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(LoraError, match=r"^meta.safetensors: .*" + expected):
        load_lora(path)


@pytest.mark.parametrize("key, value", [("ss_network_args", "{not json"), ("ss_network_dim", "eight"),
                                        ("ss_network_alpha", "nan")])
def test_kohya_network_metadata_that_is_not_what_it_says_is_refused(tmp_path, demo_unet, key, value):
    path = write_lora(tmp_path / "kohya-meta.safetensors", demo_lora_weights(demo_unet), {key: value})
    with pytest.raises(LoraError, match=rf"^kohya-meta.safetensors: its kohya metadata {key} is"):
        load_lora(path)


def test_a_lora_with_the_adapter_metadata_diffusers_writes_still_draws(tmp_path, demo_unet):
    """The checks refuse what is broken, not what is usual: a LoraConfig's own metadata, as `save_lora_weights`
    writes it, reads and draws through the CLI on the demo model."""
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(ATTENTION)).to_dict()
    config = {f"unet.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    path = write_lora(tmp_path / "usual.safetensors", demo_lora_weights(demo_unet),
                      {"lora_adapter_metadata": json.dumps(config), "ss_network_dim": "2", "ss_network_alpha": "None",
                       "ss_network_args": json.dumps({"conv_dim": "1"})})
    assert load_lora(path).adapter_metadata["unet.r"] == RANK
    out = tmp_path / "usual.png"
    assert main(["generate", "--prompt", "a toy", "--concept", str(path), "--steps", "2", "--seed", "1",
                 "--out", str(out)]) == 0
    assert out.is_file()
