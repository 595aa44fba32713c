"""Decode: telemetry chunks -> raw products (MIPS raw DCE FITS, TAUVEX Level 1a event tables,
ISOCAM CIER edited raw data).

Consumes `skybus.telemetry.>`; publishes `skybus.decoded.<instrument>.<type>`. A chunk that
cannot be decoded is dead-lettered with the reason; it never blocks the chunks behind it.
"""

from __future__ import annotations

import msgspec

from shared import fitsio
from shared.errors import Skip
from shared.messages import Envelope, ObsId, ProductRef
from shared.runtime import Context, ProductFile, ProductOut, Service
from shared.subjects import Level


class DecodeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Decode has no tunables yet; unknown fields are an error."""


class DecodeService(Service):
    name = "decode"
    Config = DecodeConfig
    config: DecodeConfig

    async def handle(self, message: Envelope, ctx: Context) -> None:
        if not isinstance(message, ProductRef):
            raise Skip(f"decode takes product references, not {type(message).__name__}")
        if (message.instrument, message.product_type) == ("MIPS", "dce"):
            await self._mips_dce(message, ctx)
        elif (message.instrument, message.product_type) == ("TAUVEX", "level1"):
            await self._tauvex_level1(message, ctx)
        elif (message.instrument, message.product_type) == ("ISOCAM", "tdf"):
            await self._isocam_tdf(message, ctx)
        else:
            raise Skip(f"no decoder for {message.instrument} {message.product_type}")

    async def _mips_dce(self, ref: ProductRef, ctx: Context) -> None:
        from services.decode.mips.decode import decode_dce, raw_product_name

        chunk = await ctx.read(ref.key)
        raw = await ctx.run(decode_dce, chunk)
        fitsio.add_provenance(raw[0].header, step="decode", parents=(ref.key,))
        o = ref.obs
        version = await ctx.version(f"MIPS.raw.{o.aorkey}.{o.channel}.{o.expid}.{o.dcenum}")
        name = raw_product_name(raw[0].header, version)
        await ctx.emit(
            ProductOut(
                instrument="MIPS",
                level=Level.DECODED,
                product_type="raw",
                obs=ref.obs,
                files=[ProductFile.fits("raw", name, raw)],
                subdir=f"aor{ref.obs.aorkey}/ch{ref.obs.channel}",
                version=version,
                parents=(ref.key,),
                group=ref.group
                and type(ref.group)(
                    ref.group.id.replace("-dce", "-raw"), ref.group.index, ref.group.count
                ),
                meta=ref.meta,
            )
        )

    async def _tauvex_level1(self, ref: ProductRef, ctx: Context) -> None:
        from services.decode.tauvex.level1a import make_level1a
        from shared.instruments import tauvex as tv

        obs = await ctx.run(tv.Level1Observation.from_bytes, await ctx.read(ref.key))
        products = await ctx.run(make_level1a, obs)
        scan = ref.obs.scan or 0
        for tele, hdul in sorted(products.items()):
            fitsio.add_provenance(hdul[0].header, step="decode", parents=(ref.key,))
            version = await ctx.version(f"TAUVEX.level1a.{scan}.{tele}")
            await ctx.emit(
                ProductOut(
                    instrument="TAUVEX",
                    level=Level.DECODED,
                    product_type="level1a",
                    obs=ObsId(scan=scan, telescope=tele),
                    files=[
                        ProductFile.fits("level1a", tauvex_name("1a", scan, tele, version), hdul)
                    ],
                    subdir=f"scan{scan:04d}",
                    version=version,
                    parents=(ref.key,),
                    meta={"level1": ref.key},
                )
            )

    async def _isocam_tdf(self, ref: ProductRef, ctx: Context) -> None:
        """Derive_ERD: a CTDF observation slice -> CIER (one row per RESET/EOI readout)."""
        from services.decode.isocam.erd import derive_erd
        from shared.instruments import isocam as ic

        obsnum = str(ref.obs.obsnum)
        cier = await ctx.run(derive_erd, await ctx.read(ref.key))
        fitsio.add_provenance(cier[0].header, step="decode Derive_ERD", parents=(ref.key,))
        version = await ctx.version(f"ISOCAM.cier.{obsnum}")
        await ctx.emit(
            ProductOut(
                instrument="ISOCAM",
                level=Level.DECODED,
                product_type="cier",
                obs=ref.obs,
                files=[ProductFile.fits("cier", f"{ic.product_name('CIER', obsnum)}.fits", cier)],
                subdir=ic.product_dir(obsnum, version),
                version=version,
                parents=(ref.key,),
                meta=ref.meta,
            )
        )


def tauvex_name(level: str, scan: int, telescope: int, version: int, suffix: str = "fits") -> str:
    """TAUVEX product name, e.g. `TAUVEX_T2_S0001_L1a_1.fits` (telescope, scan, level, version)."""
    return f"TAUVEX_T{telescope}_S{scan:04d}_L{level}_{version}.{suffix}"


SERVICE = DecodeService
