"""Start Concept Studio: `python launch.py [--model M] [--concepts DIR] [--host H] [--port P] [--share]
[--admin-token TOKEN] [--models name=source,...]`.

Switching the model (and its memory mode, and the CLIP model of an evaluation) is the operator's
(`studio/ui/operator.py`): on 127.0.0.1 the studio's own page may, without a secret; served to others (another
--host, --share, a Space) only with --admin-token (or STUDIO_ADMIN_TOKEN), and then among the --models only.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
MAX_UPLOAD = "512mb"


def main(argv: list[str] | None = None) -> int:
    from studio.cli.generate_cmd import add_weight_options
    from studio.engine.memory import MEMORY_MODES
    from studio.jobs.fair import QueueLimits
    from studio.jobs.session import DiskLimits

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="hub id, diffusers folder or .safetensors file (default: the built-in demo)")
    parser.add_argument("--concepts", default=str(REPO / "concepts"), help="shared concept library folder")
    parser.add_argument("--data", default=str(REPO / "studio-data"),
                        help="each user's session concepts (kept 7 days after their last visit) and pictures")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="make a public gradio.live link")
    parser.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--memory", default="auto", choices=MEMORY_MODES,
                        help="memory mode (see studio/engine/memory.py); auto chooses by free GPU memory")
    parser.add_argument("--low-vram", action="store_true", help="same as --memory low-vram")
    add_weight_options(parser)  # --dtype, --quantize, --model-config: every model the Model tab loads
    # What one user may hold of a shared studio (studio.ui.state.StudioLimits).
    parser.add_argument("--max-train-steps", type=int,
                        help="the most steps one training run may take (default: by the model's size: 2000 on the "
                             "demo, 1000 on SD 1.x/2.x, 500 on SDXL)")
    parser.add_argument("--user-running-jobs", type=int, default=QueueLimits.running,
                        help="jobs one user may have running on the device (default: %(default)s)")
    parser.add_argument("--user-waiting-jobs", type=int, default=QueueLimits.waiting,
                        help="jobs one user may have waiting for the device; more are refused (default: %(default)s)")
    parser.add_argument("--device-jobs", type=int, default=QueueLimits.slots,
                        help="jobs on the device at once (default: %(default)s; more on ZeroGPU, a GPU per call)")
    parser.add_argument("--session-quota-mb", type=int, default=DiskLimits.quota_bytes // 10**6,
                        help="disk one user's session may fill: its pictures, training files, uploads and concepts "
                             "(default: %(default)s MB)")
    parser.add_argument("--admin-token", default=os.environ.get("STUDIO_ADMIN_TOKEN"),
                        help="the operator's secret (default: $STUDIO_ADMIN_TOKEN, which other users of this machine "
                             "cannot read in its process list): with it the Model tab may switch the model for "
                             "everyone; without it only a studio on 127.0.0.1 may, from its own page")
    parser.add_argument("--models", default=os.environ.get("STUDIO_MODELS"),
                        help="the models to switch between, name=source pairs (an empty source: the built-in demo; "
                             "e.g. demo=,sd15=stable-diffusion-v1-5/stable-diffusion-v1-5) or a file of name=source "
                             "lines (default: $STUDIO_MODELS, else the demo and --model)")
    args = parser.parse_args(argv)

    from studio.engine.memory import apply_preset
    from studio.engine.models import LoadOptions, ModelError, ModelManager
    from studio.library import ConceptLibrary
    from studio.ui.app import build_app
    from studio.ui.operator import Operator, parse_models

    try:
        limits = user_limits(args)
    except ValueError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return 2
    try:
        operator = Operator.for_server(args.host, args.share, args.admin_token, parse_models(args.models), args.model)
    except (OSError, ValueError) as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return 2

    memory = "low-vram" if args.low_vram else args.memory
    if memory == "auto" and os.environ.get("SPACES_ZERO_GPU"):
        memory = "fast"  # ZeroGPU: no GPU to measure at start-up; each call gets a 40-70 GB slice of an A100/H200
    options = apply_preset(memory, LoadOptions(device=args.device, config=args.model_config, dtype=args.dtype,
                                                 quantize=args.quantize))
    manager = ModelManager(options)
    try:
        model = manager.load(args.model)
    except ModelError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return 2
    print(f"Concept Studio: {'built-in demo model' if model.is_demo else model.source} ({model.family}, {model.device})")
    Path(args.concepts).mkdir(parents=True, exist_ok=True)
    data = Path(args.data)
    with ConceptLibrary(args.concepts, sessions_dir=data / "sessions") as library:
        if not library.watching:
            print(f"Concept library: no file-system events ({library.watch_error}); rescanning every "
                  f"{library.refresh_interval:g} s instead")
        print("Model switching: " + ("this machine's page (127.0.0.1)" if operator.local else
                                     "the operator, with the token" if operator.switching else "off"))
        app = build_app(manager, library, memory_mode=memory, work_dir=data / "work", operator=operator,
                        limits=limits)
        # Gradio refuses bigger uploads before writing them to disk: pictures are capped far lower by
        # studio.engine.pictures, and the largest files people upload here, LoRAs and embeddings, stay below it.
        app.launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD)
    return 0


def user_limits(args: argparse.Namespace):
    """The StudioLimits of the options; ValueError naming a value out of range."""
    from studio.jobs.fair import QueueLimits
    from studio.ui.state import StudioLimits

    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max-train-steps must be at least 1, not {args.max_train_steps}")
    if args.session_quota_mb < 1:
        raise ValueError(f"--session-quota-mb must be at least 1, not {args.session_quota_mb}")
    queue = QueueLimits(slots=args.device_jobs, running=args.user_running_jobs, waiting=args.user_waiting_jobs)
    return StudioLimits(queue, args.max_train_steps, args.session_quota_mb * 10**6)


if __name__ == "__main__":
    sys.exit(main())
