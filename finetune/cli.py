"""The `finetune` command: each subcommand parses, loads the config, calls one library function, prints."""

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
    from finetune.tools.quickstart import run_quickstart

    run_quickstart(Path(args.out), steps=args.steps)


def cmd_tiny_model(args) -> None:
    from finetune.models.tiny import save_tiny_model

    print(f"tiny SDXL-architecture model written to {save_tiny_model(Path(args.out), seed=args.seed)}")


def cmd_train(args) -> None:
    cfg = _config(args)  # config errors first, before the heavy imports
    from finetune.train.recipe import train

    result = train(cfg, resume=args.resume)
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint: {result.checkpoint}\nresume with: finetune train {args.config} --resume")
    else:
        print(f"done: step {result.step}\n  weights:    {result.output_path}\n  checkpoint: {result.checkpoint}")


def cmd_dataset_build(args) -> None:
    cfg = _config(args)
    from finetune.dataset import build_dataset

    info = build_dataset(cfg.dataset, cfg.training.seed, cfg.output.manifest_dir)
    print(info.report_text)
    print(f"manifest: {info.manifest_dir} ({info.num_rows} rows)")


def cmd_dataset_inspect(args) -> None:
    cfg = _config(args)
    from finetune.dataset import inspect_dataset

    print(inspect_dataset(cfg.dataset, cfg.training.seed, cfg.output.dir / "inspect"))


def cmd_cache(args) -> None:
    cfg = _config(args)
    from finetune.cache.prepare import build_caches
    from finetune.train.builders import make_accelerator

    for line in build_caches(cfg, make_accelerator(cfg.training, cfg.logging, cfg.output.dir)):
        print(line)


def cmd_merge(args) -> None:
    from finetune.tools.merge import merge_loras
    from finetune.dtypes import DTYPES

    loras = [_lora_arg(item) for item in args.lora]
    report = merge_loras(Path(args.base), loras, Path(args.out), dtype=DTYPES[args.dtype] if args.dtype else None)
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

    print(f"written {convert_lora(Path(args.lora), Path(args.out), to=args.to)}")


def cmd_extract(args) -> None:
    from finetune.tools.extract import extract_lora

    print(extract_lora(Path(args.base), Path(args.tuned), args.rank, Path(args.out)))


def cmd_resize(args) -> None:
    from finetune.tools.resize import resize_lora

    print(resize_lora(Path(args.lora), Path(args.out), args.rank, energy=args.energy))


def cmd_caption(args) -> None:
    from finetune.tools.caption import caption_folder, format_stats

    print(format_stats(caption_folder(Path(args.folder), Path(args.model), overwrite=args.overwrite,
                                      caption_ext=args.caption_ext)))


def cmd_sample(args) -> None:
    from finetune.tools.sample import render_from_model

    out = render_from_model(Path(args.model), args.prompt, Path(args.out), seed=args.seed, steps=args.steps,
                            height=args.height, width=args.width, negative_prompt=args.negative)
    print(f"written {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune SDXL (LoRA or full) from a folder of images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_cmd(name, func, help_text, parent=sub):
        p = parent.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config", help="the TOML config (see train_config.toml)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
        p.set_defaults(func=func)
        return p

    p = sub.add_parser("quickstart", help="offline demo: images -> tiny model -> LoRA -> merge -> sample, on the CPU")
    p.add_argument("--out", default="quickstart-out", help="output folder (default: ./quickstart-out)")
    p.add_argument("--steps", type=int, default=120, help="training steps (default: 120)")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("tiny-model", help="write the tiny SDXL-architecture model as a diffusers folder")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny_model)

    p = config_cmd("train", cmd_train, "train a LoRA or the full UNet as the config says")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint (or the given step-NNNNNN folder)")

    dataset = sub.add_parser("dataset", help="build or inspect the bucketed dataset").add_subparsers(
        dest="dataset_command", required=True, metavar="ACTION")
    config_cmd("build", cmd_dataset_build, "scan, validate and bucket the images; write the manifest", dataset)
    config_cmd("inspect", cmd_dataset_inspect, "validate every file and print the bucket plan and problems", dataset)

    config_cmd("cache", cmd_cache, "encode VAE latents and text embeddings for the dataset")

    p = sub.add_parser("merge", help="merge LoRAs into a checkpoint, keeping its layout and dtype")
    p.add_argument("--base", required=True, help="SDXL diffusers folder or single-file .safetensors")
    p.add_argument("--lora", required=True, action="append", metavar="FILE[:SCALE]", help="repeatable")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default=None,
                   help="write every weight in this precision (default: each keeps the base's; fp16 halves an fp32 base)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert", help="convert a LoRA between kohya (A1111/ComfyUI) and diffusers keys")
    p.add_argument("lora")
    p.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("extract", help="extract a LoRA from the difference of two checkpoints (SVD)")
    p.add_argument("--base", required=True)
    p.add_argument("--tuned", required=True)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("resize", help="shrink a LoRA to a lower rank (SVD of each module's change)")
    p.add_argument("lora")
    p.add_argument("--rank", type=int, required=True, help="the new rank (at most, per module)")
    p.add_argument("--energy", type=float, default=None,
                   help="per module, the smallest rank keeping this share of the change, e.g. 0.95")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("caption", help="write sidecar captions with a local image-to-text model")
    p.add_argument("folder")
    p.add_argument("--model", required=True, help="local folder of a transformers image-to-text model")
    p.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    p.add_argument("--caption-ext", default=".txt")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("sample", help="render one image from a saved model")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.set_defaults(func=cmd_sample)
    return parser


def quiet_libraries() -> None:
    """Keep the console for our own messages: library chatter goes to warnings only."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub; local paths only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # diffusers and transformers set their loggers' level from these when first imported, which
    # would undo a setLevel made before that import.
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # diffusers >= 0.42 renamed from_pretrained's torch_dtype to dtype; we support older releases too.
    warnings.filterwarnings("ignore", message="`torch_dtype` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("bitsandbytes", "diffusers", "transformers", "accelerate", "datasets", "httpx", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()  # manifest saves are instant; their bars are noise
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import FinetuneError

    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        args.func(args)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
