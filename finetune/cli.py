"""The `finetune` command: each subcommand parses, loads the config, calls one library function, prints.

Each subcommand imports its machinery inside its function, so `finetune --help`, every subcommand's
`--help`, `dataset inspect`, `dataset build` and the studio's start never load torch, diffusers or
transformers (tests/finetune/test_light_commands.py checks it in a fresh process).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from pathlib import Path


def _config(args):
    from finetune.config import load_config

    return load_config(args.config, args.set or [])


def cmd_quickstart(args) -> None:
    if args.refiner:
        from finetune.tools.quickstart_refiner import run_refiner_quickstart

        run_refiner_quickstart(Path(args.out), steps=args.steps)
        return
    from finetune.tools.quickstart import run_quickstart

    run_quickstart(Path(args.out), steps=args.steps)


def cmd_tiny_model(args) -> None:
    from finetune.io import check_output

    # A folder unless the name ends in .safetensors; an existing one is replaced only with --overwrite.
    check_output(Path(args.out), overwrite=args.overwrite, folder=args.refiner or not args.out.lower().endswith(
        ".safetensors"), flag="OUT")
    if args.refiner:
        from finetune.models.tiny_refiner import save_tiny_refiner

        print(f"tiny SDXL-refiner-architecture model written to {save_tiny_refiner(Path(args.out), seed=args.seed)}")
        return
    from finetune.models.single_file import save_tiny_single_file
    from finetune.models.tiny import save_tiny_model

    out = Path(args.out)
    save = save_tiny_single_file if out.suffix.lower() == ".safetensors" else save_tiny_model
    print(f"tiny SDXL-architecture model written to {save(out, seed=args.seed)}")


def cmd_train(args) -> int:
    from finetune.config import load_config
    from finetune.errors import ConfigError
    from finetune.train.command import config_for_resume, resume_hint, run_config_of

    if args.config is None and not (args.resume and args.resume != "latest"):
        raise ConfigError("finetune train: name the config (finetune train CONFIG), or the run to continue "
                          "(finetune train --resume RUN_DIR)")
    if args.config is None:  # finetune train --resume RUN_DIR: the run's own resolved config
        config, args.resume = run_config_of(args.resume)
    else:
        config = Path(args.config)
    # Config errors first, before the heavy imports. --resume applies the run's own overrides again.
    overrides = list(args.set or [])
    if args.resume:
        cfg, overrides = config_for_resume(config, overrides)
    else:
        cfg = load_config(config, overrides)
    if args.dry_run:
        from finetune.train.dry_run import dry_run

        print(dry_run(cfg, resume=args.resume, allow_changes=args.allow_changes, gpu_gib=args.gpu_memory)[0])
        return 0
    from finetune.train.recipe import train

    result = train(cfg, resume=args.resume, allow_changes=args.allow_changes, command=(config, overrides))
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, the summary prints once
        return 130 if result.interrupted else 0
    if result.finished_before:
        epochs = cfg.training.max_epochs
        longer = f"training.max_epochs={2 * epochs}" if epochs else f"training.max_steps={2 * result.step}"
        print(f"finished already: step {result.step} is the run's last; nothing to do.\n  weights: {result.output_path}"
              f"\nto train further, resume with a longer run, e.g.: {resume_hint(config, cfg, overrides, [longer])}")
        return 0
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint: {result.checkpoint}\n"
              f"resume with: {resume_hint(config, cfg, overrides)}")
        return 130  # stopped early: scripts must not mistake it for a finished run
    samples = cfg.output.dir / "samples"
    print(f"done: step {result.step}\n  weights:    {result.output_path}\n  checkpoint: {result.checkpoint}"
          + (f"\n  samples:    {samples}" if samples.is_dir() else ""))
    return 0


def cmd_dataset_build(args) -> None:
    cfg = _config(args)
    from finetune.config import check_output_dir
    from finetune.dataset import build_dataset

    check_output_dir(cfg.output, cfg.dataset)  # the manifest goes under output.dir
    info = build_dataset(cfg.dataset, cfg.training.seed, cfg.output.manifest_dir)
    print(info.report_text)
    print(f"manifest: {info.manifest_dir} ({info.num_rows} rows)")


def cmd_dataset_inspect(args) -> None:
    cfg = _config(args)
    from finetune.dataset import inspect_run

    print(inspect_run(cfg, num_processes=args.processes))


def cmd_cache(args) -> None:
    cfg = _config(args)
    from finetune.cache.prepare import build_caches
    from finetune.train.builders import make_accelerator

    for line in build_caches(cfg, make_accelerator(cfg.training, cfg.logging, cfg.output.dir)):
        print(line)


def cmd_merge(args) -> None:
    from finetune.dtypes import DTYPES
    from finetune.tools.merge import merge_loras

    loras = [_lora_arg(item) for item in args.lora]
    report = merge_loras(Path(args.base), loras, Path(args.out), dtype=DTYPES[args.dtype] if args.dtype else None,
                         overwrite=args.overwrite)
    print(report)


def _lora_arg(text: str) -> tuple[Path, float]:
    """FILE or FILE:SCALE (a Windows drive letter's colon is not a scale)."""
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def cmd_convert(args) -> None:
    from finetune.adapters.convert import convert_lora

    print(f"written {convert_lora(Path(args.lora), Path(args.out), to=args.to, overwrite=args.overwrite)}")


def cmd_extract(args) -> None:
    from finetune.tools.extract import extract_lora

    print(extract_lora(Path(args.base), Path(args.tuned), args.rank, Path(args.out), overwrite=args.overwrite))


def cmd_resize(args) -> None:
    from finetune.tools.resize import resize_lora

    print(resize_lora(Path(args.lora), Path(args.out), args.rank, energy=args.energy, overwrite=args.overwrite))


def cmd_caption(args) -> None:
    from finetune.tools.caption import caption_folder, format_stats

    print(format_stats(caption_folder(Path(args.folder), Path(args.model), overwrite=args.overwrite,
                                      caption_ext=args.caption_ext)))


def cmd_sample(args) -> None:
    if args.refiner or args.refiner_lora:
        from finetune.errors import ConfigError
        from finetune.tools.refine import render_two_stage

        if not args.refiner:
            raise ConfigError("--refiner-lora needs the two-stage path: give the refiner with --refiner")
        out = render_two_stage(Path(args.model), Path(args.refiner), args.prompt, Path(args.out),
                               loras=[_lora_arg(item) for item in args.lora or []],
                               refiner_loras=[_lora_arg(item) for item in args.refiner_lora or []],
                               switch=args.switch, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                               height=args.height, width=args.width, negative_prompt=args.negative,
                               overwrite=args.overwrite, dtype=args.dtype)
        print(f"written {out}")
        return
    from finetune.tools.sample import render_from_model

    out = render_from_model(Path(args.model), args.prompt, Path(args.out), seed=args.seed, steps=args.steps,
                            guidance_scale=args.guidance, height=args.height, width=args.width,
                            negative_prompt=args.negative, loras=[_lora_arg(item) for item in args.lora or []],
                            overwrite=args.overwrite, dtype=args.dtype)
    print(f"written {out}")


def cmd_studio(args) -> None:
    from finetune.studio.server import serve

    serve(args.workspace, host=args.host, port=args.port, password=args.password)


OVERWRITE_HELP = "replace an existing --out (an input is never written over)"


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default, where it has one worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS))
        if shown and not action.required and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", formatter_class=_Help,
                                     description="Fine-tune SDXL (LoRA or full) from a folder of images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, func, help_text, parent=sub):
        p = parent.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                              formatter_class=_Help)
        p.set_defaults(func=func)
        return p

    def config_cmd(name, func, help_text, parent=sub, optional_because: str = ""):
        p = command(name, func, help_text, parent)
        p.add_argument("config", nargs="?" if optional_because else None,
                       help="the TOML config (copy train_config.toml and edit it)" + optional_because)
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. training.max_steps=500 or dataset.subsets.0.repeats=2 "
                            "(repeatable)")
        return p

    p = command("quickstart", cmd_quickstart, "offline demo: images -> tiny model -> LoRA -> merge -> sample, on the CPU")
    p.add_argument("--out", default="quickstart-out", help="output folder (only a folder the quickstart made is replaced)")
    p.add_argument("--steps", type=int, default=120, help="training steps")
    p.add_argument("--refiner", action="store_true", help="the two-stage path: tiny base + tiny refiner, refiner LoRA")

    p = command("tiny-model", cmd_tiny_model, "write the tiny SDXL-architecture model (random weights) for trying "
                "the toolkit offline")
    p.add_argument("out", help="a folder (diffusers layout), or a file ending in .safetensors (one SGM single file)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--refiner", action="store_true", help="the tiny SDXL refiner (bigG only, five-value conditioning)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")

    p = config_cmd("train", cmd_train, "train a LoRA or the full UNet as the config says",
                   optional_because="; optional with --resume RUN_DIR")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint (or the given step-NNNNNN folder), with the "
                        "--set overrides the run was started with; without CONFIG, a run folder (or one of its "
                        "checkpoints) resumes with its config.resolved.toml. Every form gives the same run")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept changed learning rate, scheduler, data or model settings (listed, "
                        "and the run is marked not reproducible)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every check a run makes before its slow parts (model, dataset, output folder, resume), "
                        "print the plan, the effective config and the memory estimate; write nothing")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="with --dry-run: plan the memory profile and estimate for a GPU of this size (default: the "
                        "local GPU's, or 24 without one)")

    dataset = command("dataset", None, "build or inspect the bucketed dataset").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    config_cmd("build", cmd_dataset_build, "scan, validate and bucket the images; write the manifest", dataset)
    p = config_cmd("inspect", cmd_dataset_inspect, "validate every file and print the bucket table, then the run's "
                   "plan (batches, steps, images never trained) and problems; writes nothing", dataset)
    p.add_argument("--processes", type=int, default=1, help="plan for this many training processes (GPUs)")

    config_cmd("cache", cmd_cache, "encode VAE latents and text embeddings for the dataset, as training would")

    p = command("merge", cmd_merge, "merge LoRAs into a checkpoint, keeping its dtype")
    p.add_argument("--base", required=True, help="SDXL as a diffusers folder or a single-file .safetensors")
    p.add_argument("--lora", required=True, action="append", metavar="FILE[:SCALE]",
                   help="a LoRA and its strength (1.0 when omitted); repeatable")
    p.add_argument("--out", required=True, help="a .safetensors file (one SGM single file, what A1111/Forge/ComfyUI "
                   "open) or a folder (diffusers layout)")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="write every weight in this precision (default: each keeps the base's; fp16 halves an fp32 base)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("convert", cmd_convert, "convert a LoRA between kohya (A1111/ComfyUI) and diffusers keys")
    p.add_argument("lora", help="the LoRA .safetensors to convert")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="the key layout to write")
    p.add_argument("--out", required=True, help="the converted .safetensors")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("extract", cmd_extract, "extract a LoRA from the difference of two checkpoints (SVD)")
    p.add_argument("--base", required=True, help="the original SDXL (folder or .safetensors)")
    p.add_argument("--tuned", required=True, help="the fine-tuned SDXL (same layouts)")
    p.add_argument("--rank", type=int, default=16, help="rank of the extracted LoRA")
    p.add_argument("--out", required=True, help="the LoRA .safetensors to write")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("resize", cmd_resize, "shrink a LoRA to a lower rank (SVD of each module's change)")
    p.add_argument("lora", help="the LoRA .safetensors to shrink")
    p.add_argument("--rank", type=int, required=True, help="the new rank (at most, per module)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this share of the change, e.g. 0.95")
    p.add_argument("--out", required=True, help="the smaller LoRA .safetensors")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("caption", cmd_caption, "write sidecar captions with a local image-to-text model")
    p.add_argument("folder", help="the image folder; a caption file is written beside each image")
    p.add_argument("--model", required=True,
                   help="local folder of a transformers image-to-text model (BLIP, BLIP-2, GIT, Florence-2, "
                        "VisionEncoderDecoder such as ViT-GPT2): config.json, weights, processor and tokenizer files")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--caption-ext", default=".txt", help="caption file extension: .txt or .caption")

    p = command("sample", cmd_sample, "render one image from a saved model, with LoRAs applied unmerged")
    p.add_argument("model", help="SDXL as a diffusers folder or a single-file .safetensors")
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--lora", action="append", metavar="FILE[:SCALE]", help="apply a LoRA at a strength (with "
                   "--refiner: to the base); repeatable")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="weights' precision (default: fp16 on a GPU, the VAE decoding in fp32; fp32 on the CPU)")
    p.add_argument("--refiner", help="an SDXL refiner: the base denoises to --switch, the refiner finishes")
    p.add_argument("--refiner-lora", action="append", metavar="FILE[:SCALE]", help="a LoRA for the refiner; repeatable")
    p.add_argument("--switch", type=float, default=0.8, help="fraction of the schedule the base denoises")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)

    p = command("studio", cmd_studio, "local web UI over the same configs and run folders (pip install -e \".[studio]\")")
    p.add_argument("--workspace", required=True, help="root folder; the studio reads and writes only inside it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; any but loopback needs --password")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--password", default=None,
                   help="required for a --host other than loopback (or env FINETUNE_STUDIO_PASSWORD)")
    return parser


def quiet_libraries(heavy: bool = True) -> None:
    """Keep the console for our own messages: library chatter goes to warnings only.

    `heavy`: the command will load diffusers and transformers anyway, so importing them here costs
    nothing; a light command gets only the environment switches, which the libraries read when (if
    ever) they are imported.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub; local paths only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers and transformers set their loggers' level from these when first imported, which
    # would undo a setLevel made before that import.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Loading bars ("Loading pipeline components", nested "Loading weights") take a second and leave
    # raw cursor codes in logs; manifest saves are instant. Our own bars say what a wait is for.
    # datasets and transformers read these switches at import; diffusers has none.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # diffusers >= 0.42 renamed from_pretrained's torch_dtype to dtype; we support older releases too.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if heavy:  # these imports take seconds: light commands never pay for them
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import FinetuneError

    args = build_parser().parse_args(argv)
    # The commands that must start at once; the studio loads the tools in the background once it answers.
    quiet_libraries(heavy=args.func not in (cmd_dataset_build, cmd_dataset_inspect, cmd_studio))
    try:
        return args.func(args) or 0
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Every file is written to a temporary name and renamed: what was there before is intact.
        where = f" writing {err.filename}" if err.filename else ""
        print(f"error: disk full{where}; files written before are intact: free some space and run the "
              "command again (training: with --resume)", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch.OutOfMemoryError, matched by name: this module never imports torch
        if type(err).__name__ != "OutOfMemoryError":
            raise
        print(f"error: out of GPU memory in `finetune {args.command}`: {OUT_OF_MEMORY.get(args.func, OOM_ANY)}",
              file=sys.stderr)
        return 2


OOM_ANY = "close other programs using the GPU, or run it on a card with more memory"
# What frees memory in each command (training says its own, with the checkpoint to resume from).
OUT_OF_MEMORY = {
    cmd_cache: "lower cache.batch_size (1 fits any card), then run it again; finished cache shards are kept",
    cmd_sample: "lower --height and --width (e.g. 768), or sample with fewer LoRAs; " + OOM_ANY,
    cmd_merge: "merge on a machine with more memory; the merge writes nothing until it is complete",
}


if __name__ == "__main__":
    sys.exit(main())
