"""Mosaic: calibrated frames -> post-BCD mosaics per AOR and band (MIPS, archive BCDs),
Level 2 images per scan (TAUVEX) and AAR maps per observation (ISOCAM CMAP + CMOS), each with
uncertainty, coverage and a quick-look PNG.

Consumes `skybus.calibrated.>`; waits (JetStream KV) until every member of a group has arrived,
then builds the mosaic once; publishes `skybus.mosaicked.<instrument>.<type>`.
"""

from __future__ import annotations

import hashlib
import json

import msgspec

from shared import fitsio
from shared.bcd import BCDFrame, read_frames
from shared.errors import BadData, Skip
from shared.instruments import mips
from shared.messages import Envelope, Group, ProductRef
from shared.runtime import Context, ProductFile, ProductOut, Service
from shared.subjects import Level


class MosaicConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Mosaic parameters (env SKYBUS_MOSAIC_<FIELD>, or --set field=value)."""

    drop_first_dce: bool = True  #: skip MIPS 24 um DCENUM 0 frames (first-frame effect, as MOPEX)
    self_flat: bool = False  #: divide frames by their own median flat first
    match_background: bool = True  #: overlap: per-frame offsets, sum zero
    outlier_sigma: float = 4.0  #: temporal outlier threshold (sigma)
    pixel_arcsec: float = 0.0  #: output pixel; 0 = the band default (2.45/4/8" for MIPS)


def ensemble_id(*parts: object) -> int:
    """A stable 7-digit ensemble product id (Spitzer post-BCD names carry one)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()
    return 1_000_000 + int(digest[:8], 16) % 9_000_000


class MosaicService(Service):
    name = "mosaic"
    Config = MosaicConfig
    config: MosaicConfig

    async def handle(self, message: Envelope, ctx: Context) -> None:
        if not isinstance(message, ProductRef):
            raise Skip(f"mosaic takes product references, not {type(message).__name__}")
        if message.product_type == "bcd":
            await self._post_bcd(message, ctx)
        elif message.instrument == "TAUVEX" and message.product_type == "level1g":
            await self._tauvex_level2(message, ctx)
        elif message.instrument == "ISOCAM" and message.product_type == "spd":
            await self._isocam_maps(message, ctx)
        else:
            raise Skip(f"mosaic does not use {message.instrument} {message.product_type}")

    async def _post_bcd(self, ref: ProductRef, ctx: Context) -> None:
        from services.mosaic.coadd import NoUsableFramesError, build_mosaic, has_first_frame_effect
        from services.mosaic.pbcd import mosaic_hdus
        from shared.quicklook import quicklook_png

        if ref.group is None:
            raise Skip("a BCD without a group (AOR + band) is not mosaicked")
        member = json.dumps(
            {
                "key": ref.key,
                "bunc": getattr(ref.file("bunc"), "key", ""),
                "mask": getattr(ref.file("mask"), "key", ""),
            }
        )
        arrival = await ctx.arrive(ref.group, version=ref.version, member_key=member)
        if not arrival.trigger:
            raise Skip(f"waiting for the group: {len(arrival.members)}/{ref.group.count} BCDs")
        members = [json.loads(arrival.members[i]) for i in sorted(arrival.members)]
        frames = await self._usable_frames(members, ctx)
        used = {f.key for f in frames}
        members = [m for m in members if m["key"] in used]
        c = self.config
        try:
            mosaic = await ctx.run(
                build_mosaic,
                frames,
                pixel_arcsec=c.pixel_arcsec or None,
                drop_first_dce=c.drop_first_dce,  # build_mosaic knows which arrays it affects
                self_flat=c.self_flat,
                match_background=c.match_background,
                outlier_sigma=c.outlier_sigma,
            )
        except NoUsableFramesError as exc:
            hint = ""
            if c.drop_first_dce and all(
                f.dcenum == 0 and has_first_frame_effect(f) for f in frames
            ):
                hint = (" (every frame is DCENUM 0: to mosaic them anyway, set "
                        "SKYBUS_MOSAIC_DROP_FIRST_DCE=false)")
            raise BadData(f"{exc}{hint}") from exc
        o = ref.obs
        inst, ch, aor = ref.instrument, int(o.channel or 0), int(o.aorkey or 0)
        version = await ctx.version(f"{inst}.pbcd.{aor}.{ch}")
        hdus = await ctx.run(
            mosaic_hdus, mosaic, template_header=frames[0].header, creator=fitsio.CREATOR
        )
        ens = ensemble_id(inst, aor, ch)
        letter = {"MIPS": "M", "IRAC": "I", "IRS": "S"}.get(inst, "X")

        def name(kind: str, suffix: str = "fits") -> str:
            if inst == "MIPS":
                return mips.pbcd_name(ch, aor, 0, version, ens, kind, suffix)
            return f"SPITZER_{letter}{ch}_{aor}_0000_{version}_E{ens}_{kind}.{suffix}"

        parents = tuple(m["key"] for m in members)
        for h in hdus.values():
            fitsio.add_provenance(h[0].header, step="mosaic", parents=())
        png = await ctx.run(quicklook_png, mosaic.image, title=f"{inst} ch{ch} AOR {aor}")
        manifest = json.dumps({"frames": members}, indent=1).encode()
        channels = [int(x) for x in str(ref.meta.get("aor_channels", ch)).split(",") if x]
        await ctx.emit(
            ProductOut(
                instrument=inst,
                level=Level.MOSAICKED,
                product_type="maic",
                obs=ref.obs.__class__(aorkey=aor, channel=ch),
                files=[
                    ProductFile.fits("maic", name("maic"), hdus["maic"]),
                    ProductFile.fits("munc", name("munc"), hdus["munc"]),
                    ProductFile.fits("mcov", name("mcov"), hdus["mcov"]),
                    ProductFile("quicklook", name("maic", "png"), png),
                    ProductFile("frames", name("frames", "json"), manifest),
                ],
                subdir=f"aor{aor}/ch{ch}",
                version=version,
                parents=parents,
                group=Group.aor_mosaics(inst, aor, ch, channels, ref.run_id),
                meta={
                    **ref.meta,
                    "n_frames_used": mosaic.n_frames_used,
                    "n_outliers": mosaic.n_outliers,
                },
            )
        )
        ctx.group_done_after_publish(ref.group.id, ref.version)

    async def _usable_frames(
        self, members: list[dict[str, str]], ctx: Context
    ) -> list[BCDFrame]:
        """The group's frames that can be read and placed on the sky; each one that cannot is
        a dead letter naming it, and the mosaic is made from the others."""
        from services.mosaic.grid import stray_frames

        problems: list[str] = []

        def bad(key: str, reason: str) -> None:
            problems.append(f"{key}: {reason}")
            ctx.dead_letter(f"{reason}; the mosaic is made without it", item=key)

        frames = await read_frames(ctx.read_fits, members, on_bad=bad)
        strays = dict(stray_frames(frames))
        for i, sep in strays.items():
            bad(frames[i].key, f"its centre is {sep:.1f} deg from the other frames' (wrong WCS, "
                "or a frame of another field)")
        frames = [f for i, f in enumerate(frames) if i not in strays]
        if not frames:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise BadData(f"none of the group's {len(members)} BCDs can be used: "
                          f"{problems[0] if problems else 'no frame'}{more}")
        return frames

    async def _tauvex_level2(self, ref: ProductRef, ctx: Context) -> None:
        from services.decode.service import tauvex_name
        from services.mosaic.tauvex.image import make_level2
        from shared.instruments import tauvex as tv

        level1g = await ctx.read_fits(ref.key)
        level1_key = str(ref.meta["level1"])
        obs = await ctx.run(tv.Level1Observation.from_bytes, await ctx.read(level1_key))
        scan, tele = ref.obs.scan or 0, ref.obs.telescope or 0
        level2 = await ctx.run(make_level2, level1g, obs.attitude)
        fitsio.add_provenance(level2.hdul[0].header, step="mosaic level2", parents=(ref.key,))
        version = await ctx.version(f"TAUVEX.level2.{scan}.{tele}")
        await ctx.emit(
            ProductOut(
                instrument="TAUVEX",
                level=Level.MOSAICKED,
                product_type="level2",
                obs=ref.obs,
                files=[
                    ProductFile.fits("image", tauvex_name("2", scan, tele, version), level2.hdul),
                    ProductFile(
                        "quicklook", tauvex_name("2", scan, tele, version, "png"), level2.png
                    ),
                ],
                subdir=f"scan{scan:04d}",
                version=version,
                parents=(ref.key,),
                group=Group(f"TAUVEX-{scan}-level2", tele - 1, len(tv.TELESCOPES)),
                meta={"filter": tv.TELESCOPES[tele].filter.name},
            )
        )

    async def _isocam_maps(self, ref: ProductRef, ctx: Context) -> None:
        """AAR maps: the CCIM of an observation -> CMOS raster mosaic (primary), CMAP flux
        maps per pointing and a quick-look PNG of the CMOS flux."""
        from services.mosaic.isocam.maps import make_maps
        from shared.instruments import isocam as ic

        obsnum = str(ref.obs.obsnum)
        ccim_obj = ref.file("ccim")
        if ccim_obj is None:
            raise BadData(f"ISOCAM SPD {ref.key} has no CCIM companion: nothing to map")
        ccim = await ctx.read_fits(ccim_obj.key)
        maps = await ctx.run(make_maps, ccim)
        for hdul in (maps.cmos, maps.cmap):
            fitsio.add_provenance(hdul[0].header, step="mosaic AAR maps", parents=(ccim_obj.key,))
        version = await ctx.version(f"ISOCAM.cmos.{obsnum}")
        cmos_name = ic.product_name("CMOS", obsnum)
        await ctx.emit(
            ProductOut(
                instrument="ISOCAM",
                level=Level.MOSAICKED,
                product_type="cmos",
                obs=ref.obs,
                files=[
                    ProductFile.fits("cmos", f"{cmos_name}.fits", maps.cmos),
                    ProductFile.fits("cmap", f"{ic.product_name('CMAP', obsnum)}.fits", maps.cmap),
                    ProductFile("quicklook", f"{cmos_name}.png", maps.png),
                ],
                subdir=ic.product_dir(obsnum, version),
                version=version,
                parents=(ccim_obj.key,),
                meta={
                    "aot": str(ref.meta.get("aot", "")),
                    "object": str(ref.meta.get("object", "")),
                    "filter": str(maps.cmos[0].header.get("FILTER", "")),
                },
            )
        )


SERVICE = MosaicService
