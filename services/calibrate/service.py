"""Calibrate: raw products -> calibrated products (MIPS BCD + bunc + bbmsk/bmask + fbcd;
TAUVEX Level 1b..1g; ISOCAM SPD: CISP + CGLL + CCIM). Scales out horizontally: replicas share
one durable consumer.

Consumes `skybus.decoded.>`; publishes `skybus.calibrated.<instrument>.<type>`. MIPS 24 um is
calibrated per DCE; Ge (70/160 um) per AOR and channel, once every DCE of the group has
arrived (the stim flashes that track the responsivity are spread over the AOR).
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from shared import fitsio
from shared.errors import Skip, Transient
from shared.messages import Envelope, Group, ObsId, ProductRef
from shared.runtime import Context, ProductFile, ProductOut, Service
from shared.subjects import Level


class CalibrateConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Calibrate parameters (env SKYBUS_CALIBRATE_<FIELD>, or --set field=value)."""

    #: MIPS DCENUM 0 response depression, fraction (first-frame effect, seed 001: 10-15%).
    first_dce_depression: float = 0.12
    #: MIPS DCENUM 1..2 response depression, fraction (~2%).
    early_dce_depression: float = 0.02
    #: MIPS DCEs wait (retried with back-off, then dead-lettered with the reason) until their
    #: channel's DARK and FLAT are registered, instead of being calibrated without them when
    #: they arrive before the calibration files; false calibrates without (steps SKIPPED,
    #: pixels flagged NO_CALIBRATION).
    require_calibration: bool = True
    #: TAUVEX levels kept in the store (1a comes from decode; 1g is needed by mosaic).
    tauvex_keep_levels: tuple[str, ...] = ("1g",)


class CalibrateService(Service):
    name = "calibrate"
    Config = CalibrateConfig
    config: CalibrateConfig

    def __init__(self, config: CalibrateConfig) -> None:
        super().__init__(config)
        self._cal_cache: dict[tuple[int, tuple[tuple[str, str], ...]], object] = {}

    async def handle(self, message: Envelope, ctx: Context) -> None:
        if not isinstance(message, ProductRef):
            raise Skip(f"calibrate takes product references, not {type(message).__name__}")
        kind = (message.instrument, message.product_type)
        if kind == ("MIPS", "raw") and message.obs.channel == 1:
            await self._mips24(message, ctx)
        elif kind == ("MIPS", "raw"):
            await self._mips_ge(message, ctx)
        elif kind == ("TAUVEX", "level1a"):
            await self._tauvex(message, ctx)
        elif kind == ("ISOCAM", "cier"):
            await self._isocam(message, ctx)
        else:
            raise Skip(f"nothing to calibrate for {message.instrument} {message.product_type}")

    # --- MIPS -----------------------------------------------------------------------------

    def _mips_config(self) -> object:
        from services.calibrate.mips.config import MipsCalibrateConfig

        return MipsCalibrateConfig(
            first_dce_depression=self.config.first_dce_depression,
            early_dce_depression=self.config.early_dce_depression,
        )

    async def _calibration(self, channel: int, ctx: Context) -> object:
        from services.calibrate.mips.calfiles import MipsCalibration

        keys = await ctx.calibration.lookup("MIPS", channel)
        missing = [t for t in ("DARK", "FLAT") if t not in keys]
        if missing and self.config.require_calibration:
            raise Transient(
                f"MIPS channel {channel}: no {' and '.join(missing)} calibration registered yet; "
                "the DCE is retried and then dead-lettered: submit the calibration files "
                "(e.g. `skybus run` on a directory holding them), then replay, or set calibrate "
                "require_calibration=false to calibrate without them"
            )
        cache_key = (channel, tuple(sorted(keys.items())))
        if cache_key not in self._cal_cache:
            hdus = [await ctx.read_fits(k) for k in keys.values()]
            names = {i: k.rsplit("/", 1)[-1] for i, k in enumerate(keys.values())}
            self._cal_cache[cache_key] = MipsCalibration.from_hdus(hdus, names=names)
        return self._cal_cache[cache_key]

    async def _emit_bcd(
        self,
        products: object,
        ctx: Context,
        *,
        version: int,
        group: Group | None,
        parents: tuple[str, ...],
        meta: dict[str, str | int | float | bool],
    ) -> None:
        from services.calibrate.mips.bcd import BCDProducts, mask_kind

        assert isinstance(products, BCDProducts)
        ch = products.channel
        files = [
            ProductFile.fits("bcd", products.names["bcd"], products.bcd),
            ProductFile.fits("bunc", products.names["bunc"], products.bunc),
            ProductFile.fits("mask", products.names[mask_kind(ch)], products.mask),
        ]
        if products.fbcd is not None:
            files.append(ProductFile.fits("fbcd", products.names["fbcd"], products.fbcd))
        for f in (products.bcd, products.bunc, products.mask):
            fitsio.add_provenance(f[0].header, step="calibrate", parents=parents)
        await ctx.emit(
            ProductOut(
                instrument="MIPS",
                level=Level.CALIBRATED,
                product_type="bcd",
                obs=ObsId(
                    aorkey=products.aorkey, channel=ch, expid=products.expid, dcenum=products.dcenum
                ),
                files=files,
                subdir=f"aor{products.aorkey}/ch{ch}",
                version=version,
                parents=parents,
                group=group,
                meta=meta,
            )
        )

    async def _mips24(self, ref: ProductRef, ctx: Context) -> None:
        from services.calibrate.mips.pipeline import calibrate_mips24_dce

        raw = await ctx.read_fits(ref.key)
        cal = await self._calibration(1, ctx)
        o = ref.obs
        version = await ctx.version(f"MIPS.bcd.{o.aorkey}.1.{o.expid}.{o.dcenum}")
        products = await ctx.run(
            calibrate_mips24_dce,
            raw,
            cal,
            self._mips_config(),
            creator=fitsio.CREATOR,
            version=version,
        )
        group = ref.group and Group(f"MIPS-{o.aorkey}-ch1-bcd", ref.group.index, ref.group.count)
        await self._emit_bcd(
            products, ctx, version=version, group=group, parents=(ref.key,), meta=ref.meta
        )

    async def _mips_ge(self, ref: ProductRef, ctx: Context) -> None:
        from services.calibrate.mips.pipeline import calibrate_ge_group

        if ref.group is None:
            raise Skip("a Ge raw DCE without its AOR group cannot be calibrated (stims needed)")
        arrival = await ctx.arrive(ref.group, version=ref.version, member_key=ref.key)
        if not arrival.trigger:
            raise Skip(f"waiting for the AOR: {len(arrival.members)}/{ref.group.count} DCEs")
        keys = [arrival.members[i] for i in sorted(arrival.members)]
        raws = [await ctx.read_fits(k) for k in keys]
        o = ref.obs
        cal = await self._calibration(int(o.channel or 0), ctx)
        version = await ctx.version(f"MIPS.bcdgroup.{o.aorkey}.{o.channel}")
        results = await ctx.run(
            calibrate_ge_group,
            raws,
            cal,
            self._mips_config(),
            creator=fitsio.CREATOR,
            version=version,
        )
        for index, products in enumerate(results):
            await self._emit_bcd(
                products,
                ctx,
                version=version,
                group=Group(f"MIPS-{o.aorkey}-ch{o.channel}-bcd", index, len(results)),
                parents=tuple(keys),
                meta=ref.meta,
            )
        ctx.group_done_after_publish(ref.group.id, ref.version)

    # --- TAUVEX ---------------------------------------------------------------------------

    async def _tauvex_reference(self, ctx: Context) -> tuple[Any, Any]:
        """RA, Dec (deg) of the astrometric reference catalogue (CALTYPE REFCAT), if one was
        submitted; without it REGISTER registers on the observation's own bright sources."""
        key = (await ctx.calibration.lookup("TAUVEX", 0)).get("REFCAT")
        if key is None:
            return None, None
        table = (await ctx.read_fits(key))[1].data
        return np.asarray(table["RA"], dtype=float), np.asarray(table["DEC"], dtype=float)

    async def _tauvex(self, ref: ProductRef, ctx: Context) -> None:
        from services.calibrate.tauvex.chain import run_chain
        from services.decode.service import tauvex_name
        from shared.instruments import tauvex as tv

        level1a = await ctx.read_fits(ref.key)
        level1_key = str(ref.meta["level1"])
        obs = await ctx.run(tv.Level1Observation.from_bytes, await ctx.read(level1_key))
        scan, tele = ref.obs.scan or 0, ref.obs.telescope or 0
        keep = {*self.config.tauvex_keep_levels, "1g"}  # mosaic needs 1g
        ref_ra, ref_dec = await self._tauvex_reference(ctx)
        levels = await ctx.run(
            run_chain,
            level1a,
            obs.attitude,
            keep_levels=tuple(keep),
            reference_ra_deg=ref_ra,
            reference_dec_deg=ref_dec,
        )
        for level, hdul in sorted(levels.items()):
            if level == "1a":
                continue  # decode's product already
            fitsio.add_provenance(hdul[0].header, step=f"calibrate {level}", parents=(ref.key,))
            version = await ctx.version(f"TAUVEX.level{level}.{scan}.{tele}")
            await ctx.emit(
                ProductOut(
                    instrument="TAUVEX",
                    level=Level.CALIBRATED,
                    product_type=f"level{level}",
                    obs=ref.obs,
                    files=[
                        ProductFile.fits(
                            f"level{level}", tauvex_name(level, scan, tele, version), hdul
                        )
                    ],
                    subdir=f"scan{scan:04d}",
                    version=version,
                    parents=(ref.key,),
                    meta={"level1": level1_key},
                )
            )

    # --- ISOCAM ---------------------------------------------------------------------------

    async def _isocam(self, ref: ProductRef, ctx: Context) -> None:
        """Derive_SPD: CIER -> CISP pair rates (primary), CGLL glitch list, CCIM images."""
        from services.calibrate.isocam.chain import calibrate_observation
        from shared.instruments import isocam as ic

        obsnum = str(ref.obs.obsnum)
        cier = await ctx.read_fits(ref.key)
        spd = await ctx.run(calibrate_observation, cier)
        version = await ctx.version(f"ISOCAM.spd.{obsnum}")
        files = []
        for root, hdul in (("CISP", spd.cisp), ("CGLL", spd.cgll), ("CCIM", spd.ccim)):
            fitsio.add_provenance(hdul[0].header, step="calibrate Derive_SPD", parents=(ref.key,))
            name = f"{ic.product_name(root, obsnum)}.fits"
            files.append(ProductFile.fits(root.lower(), name, hdul))
        await ctx.emit(
            ProductOut(
                instrument="ISOCAM",
                level=Level.CALIBRATED,
                product_type="spd",
                obs=ref.obs,
                files=files,
                subdir=ic.product_dir(obsnum, version),
                version=version,
                parents=(ref.key,),
                meta={**ref.meta, "n_glitches": int(spd.glitch.sum())},
            )
        )


SERVICE = CalibrateService
