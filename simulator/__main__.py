"""Command line: write a simulated MIPS AOR (telemetry, calibration, truth) to a folder.

python -m simulator OUTDIR [--small | --scan] [--channels 1,2] [--seed N] [--psf airy]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from simulator.mips import MipsAORConfig, write_aor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulator", description=__doc__.splitlines()[0])
    p.add_argument("outdir")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--small", action="store_true", help="the fast test AOR")
    kind.add_argument("--scan", action="store_true", help="a scan-map AOR")
    p.add_argument("--channels", default=None, help="comma-separated MIPS channels, e.g. 1,2,3")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--psf", choices=("gaussian", "airy"), default=None,
                   help="the optics: a Gaussian of the band's FWHM (default), or the diffraction "
                        "pattern of the 85 cm mirror with its rings, as the real MIPS PSF")
    p.add_argument("--obscuration", type=float, default=None,
                   help="central obscuration (diameter ratio) of the Airy pattern (0.3)")
    args = p.parse_args(argv)
    cfg = (
        MipsAORConfig.small() if args.small else MipsAORConfig.scan_map() if args.scan
        else MipsAORConfig()
    )  # fmt: skip
    changes: dict[str, object] = {}
    if args.channels:
        changes["channels"] = tuple(int(c) for c in args.channels.split(","))
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.psf is not None:
        changes["psf"] = args.psf
    if args.obscuration is not None:
        changes["airy_obscuration"] = args.obscuration
    cfg = dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]
    for path in write_aor(cfg, args.outdir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
