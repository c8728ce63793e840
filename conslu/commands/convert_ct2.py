"""``conslu convert-ct2 SRC [--out DIR] [--force]``: convert a CTranslate2 Whisper checkpoint to a
Hugging Face folder (:func:`conslu.ct2.convert_ct2`). SRC is a folder, or a short name / package
name of :mod:`conslu.pretrained` (then the installed package's files, into the ConSLU cache folder
by default). Prints the output folder; exit 1 when the conversion fails, 2 for an unknown SRC."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NAME = "convert-ct2"
HELP = "convert a CTranslate2 Whisper model to a Hugging Face folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="CTranslate2 model folder, an installed package name, or a short name (whisper-tiny.en, whisper-base, whisper-small)")
    p.add_argument("--out", default=None, help="output folder (default: the ConSLU cache folder for short names)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output folder")


def run(args: argparse.Namespace) -> int:
    from conslu import pretrained
    from conslu.ct2 import Ct2Error, convert_ct2, is_converted

    try:
        spec = pretrained.lookup(args.src)
        if spec is not None:
            files = pretrained.package_files(spec)
            out = Path(args.out) if args.out else pretrained.cache_dir(spec.name)
            label = f"PyPI {' + '.join(spec.packages)}"
        else:
            src = Path(args.src)
            if not src.exists():
                known = ", ".join(pretrained.short_names())
                print(f"conslu: {args.src}: not a folder, an installed model package, or a known short name ({known})",
                      file=sys.stderr)
                return 2
            files = [src]
            out = Path(args.out) if args.out else None
            if out is None:
                print(f"conslu: {args.src}: give --out for a local CTranslate2 folder", file=sys.stderr)
                return 2
            label = str(src.resolve())
        if out.exists() and not args.force:
            if is_converted(out):
                print(f"conslu: {out}: already converted (use --force to redo)", file=sys.stderr)
                print(out)
                return 0
            print(f"conslu: {out}: exists and is not a converted model; use --force to overwrite", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        if spec is not None:  # verified against the pinned SHA-256, under the conversion lock
            pretrained.convert_known(spec, out, force=args.force)
        else:
            convert_ct2(files, out, force=args.force, source_label=label)
    except (Ct2Error, pretrained.ModelNotAvailable, FileExistsError, OSError) as exc:
        print(f"conslu: {exc}", file=sys.stderr)
        return 1
    print(f"conslu: converted {label} in {time.perf_counter() - t0:.1f} s (verified tensor by tensor)", file=sys.stderr)
    print(out)
    return 0
