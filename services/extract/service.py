"""Extract: mosaics -> per-band point-source lists, then band-merged lists with upper limits.

Consumes `skybus.mosaicked.>`; publishes `skybus.sources.<instrument>.<type>`: `sources` per
band (IPAC .tbl + FITS table) as soon as a band's mosaic arrives, `bandmerged` once every band
of the AOR (or TAUVEX scan) has its mosaic; a band without a detection gets an upper limit
measured from its underlying frames. ISOCAM: one CPSL point-source list per observation
(FITS + IPAC .tbl) from its CMOS mosaic and CMAP maps.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

import msgspec
import numpy as np
from astropy.io import fits
from astropy.table import Table

from shared import fitsio
from shared.bcd import BCDFrame, read_frames
from shared.errors import BadData, Skip
from shared.instruments import mips
from shared.messages import Envelope, ObsId, ProductRef
from shared.runtime import Context, ProductFile, ProductOut, Service
from shared.subjects import Level


class ExtractConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Extract parameters (env SKYBUS_EXTRACT_<FIELD>, or --set field=value)."""

    detect_sigma: float = 5.0  #: detection threshold, sigma of the matched-filter map
    #: band-merged upper limits are max(forced flux, 0) + this x its sigma (one-sided 99.4%
    #: confidence for 2.5): the undetected sources of a deep field carry 1-5 sigma of real
    #: flux, measured by the forced fit, so a further 3 sigma would make limits ~2x the noise
    upper_limit_sigma: float = 2.5
    #: refine PRF fluxes and positions on the BCDs themselves (APEX multiframe) when the
    #: mosaic oversamples them (BCD pixel >= 1.8 mosaic pixels, e.g. MIPS 70 um) or its PRF
    #: fit measurably misses the mosaic's PSF (meta PRFMISM > 1%: e.g. a scan map whose BCD
    #: grid is aligned with the mosaic's): "auto", "always" (whenever the frames are known)
    #: or "never"
    multiframe: Literal["auto", "always", "never"] = "auto"
    #: PRF of the point-source fits: "auto" (the Gaussian, unless the telescope's diffraction
    #: pattern fits the bright sources better) or "gaussian"
    prf: Literal["auto", "gaussian"] = "auto"
    #: PRF files by band, used as given: "24um=/data/prf24.fits,70um=/data/prf70.fits" (FITS
    #: images with OVERSAMP and PIXSCALE in the header, e.g. the SSC's PRFs for the mosaic
    #: pixel scale)
    prf_files: str = ""

    def __post_init__(self) -> None:
        self.prf_file("")  # a malformed list fails at start-up, not on the first mosaic

    def prf_file(self, band: str) -> str | None:
        """The PRF file configured for `band`, if any."""
        files: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.prf_files.split(","))):
            key, sep, path = item.partition("=")
            if not sep or not key.strip() or not path.strip():
                raise ValueError(f"prf_files: {item!r} is not band=path "
                                 "(e.g. 24um=/data/prf24.fits)")
            files[key.strip()] = path.strip()
        return files.get(band)


def band_name(instrument: str, channel: int) -> str:
    if instrument == "MIPS" and channel in mips.BANDS:
        return mips.BANDS[channel].name
    return f"{instrument.lower()}{channel}"


class ExtractService(Service):
    name = "extract"
    Config = ExtractConfig
    config: ExtractConfig

    async def prepare(self, log: Any) -> None:
        from services.extract.jit import compile_kernels

        # The extraction's compiled kernels: ~30 s to compile on a fresh install (then cached on
        # disk, ~0.4 s to load); done here so that no message waits for it.
        log.info("prf_kernels_loading")
        seconds = await asyncio.to_thread(compile_kernels)
        log.info("prf_kernels_ready", seconds=round(seconds, 2))

    async def handle(self, message: Envelope, ctx: Context) -> None:
        if not isinstance(message, ProductRef):
            raise Skip(f"extract takes product references, not {type(message).__name__}")
        if message.product_type == "maic":
            await self._post_bcd(message, ctx)
        elif message.instrument == "TAUVEX" and message.product_type == "level2":
            await self._tauvex(message, ctx)
        elif message.instrument == "ISOCAM" and message.product_type == "cmos":
            await self._isocam(message, ctx)
        else:
            raise Skip(f"extract does not use {message.instrument} {message.product_type}")

    async def _frames(
        self, manifest_key: str, ctx: Context, cache: dict[str, list[BCDFrame]]
    ) -> list[BCDFrame]:
        """The BCD frames a mosaic was made from (its frames manifest), read once per message."""
        if not manifest_key:
            return []
        if manifest_key not in cache:
            members = json.loads(await ctx.read(manifest_key))["frames"]
            cache[manifest_key] = await read_frames(ctx.read_fits, members)
        return cache[manifest_key]

    async def _post_bcd(self, ref: ProductRef, ctx: Context) -> None:
        from services.extract.photometry import extract_sources, pixel_scale_arcsec
        from services.extract.prf import TabulatedPrf
        from services.extract.prfmodel import load_prf_file
        from services.extract.tables import to_fits_hdulist, to_ipac_bytes

        inst, ch, aor = ref.instrument, int(ref.obs.channel or 0), int(ref.obs.aorkey or 0)
        image, header = fitsio.image_hdu(await ctx.read_fits(ref.key))
        unc_obj, cov_obj = ref.file("munc"), ref.file("mcov")
        unc = fitsio.image_hdu(await ctx.read_fits(unc_obj.key))[0] if unc_obj else None
        cov = fitsio.image_hdu(await ctx.read_fits(cov_obj.key))[0] if cov_obj else None
        band = band_name(inst, ch)
        prf_model: str | TabulatedPrf = self.config.prf
        prf_path = self.config.prf_file(band)
        if prf_path:
            prf_model = await ctx.run(load_prf_file, prf_path,
                                      pixel_arcsec=pixel_scale_arcsec(header))
        table: Table = await ctx.run(
            extract_sources,
            image,
            unc,
            cov,
            header,
            fwhm_arcsec=None,
            band_name=band,
            detect_sigma=self.config.detect_sigma,
            prf_model=prf_model,
        )
        prf_meta = {k.lower(): table.meta[k] for k in ("PRFMODEL", "FWHM", "PRFLAMD", "PRFOBSC",
                                                       "PRFBLUR", "PRFDCHI2", "PRFTEST",
                                                       "PRFWHY", "APCORR") if k in table.meta}
        if table.meta.get("PRFTEST") == 0:
            ctx.log.warning("prf_model_untested", band=band, key=ref.key, **prf_meta,
                            hint="fewer than 3 sources at S/N >= 30: the Gaussian PSF is "
                                 "assumed; on diffraction-limited data pass a PRF file "
                                 "(extract prf_files)")
        else:
            ctx.log.info("prf_model", band=band, key=ref.key, **prf_meta)
        frames_cache: dict[str, list[BCDFrame]] = {}
        table = await self._multiframe(table, ref, header, band, ctx, frames_cache)
        stem = re.sub(r"_maic\.fits$", "", ref.key.rsplit("/", 1)[-1], flags=re.IGNORECASE)
        version = ref.version
        cards = {k: header[k] for k in ("TELESCOP", "INSTRUME", "CHNLNUM", "AORKEY") if k in header}
        hdul = await ctx.run(to_fits_hdulist, table, cards)
        fitsio.add_provenance(hdul[0].header, step="extract", parents=(ref.key,))
        await ctx.emit(
            ProductOut(
                instrument=inst,
                level=Level.SOURCES,
                product_type="sources",
                obs=ObsId(aorkey=aor, channel=ch),
                files=[
                    ProductFile("tbl", f"{stem}_sources.tbl", await ctx.run(to_ipac_bytes, table)),
                    ProductFile.fits("fits", f"{stem}_sources.fits", hdul),
                ],
                subdir=f"aor{aor}/ch{ch}",
                version=version,
                parents=(ref.key,),
                meta={"n_sources": len(table), "band": band},
            )
        )
        if ref.group is None or ref.group.count < 2:
            return
        member = json.dumps(
            {
                "maic": ref.key,
                "munc": getattr(ref.file("munc"), "key", ""),
                "mcov": getattr(ref.file("mcov"), "key", ""),
                "frames": getattr(ref.file("frames"), "key", ""),
                "channel": ch,
                "sources": ctx.outputs[-1].companions[0].key,
            }
        )
        # The bands of one submission meet in the same generation whatever their own product
        # versions are (a band processed before has a higher one); a replay is the next one.
        generation = await ctx.generation(ref.group, member_key=member)
        arrival = await ctx.arrive(ref.group, version=generation, member_key=member)
        if not arrival.trigger:
            return
        await self._bandmerge(ref, arrival.members, ctx, frames_cache)
        ctx.group_done_after_publish(ref.group.id, generation)

    async def _multiframe(
        self,
        table: Table,
        ref: ProductRef,
        header: fits.Header,
        band: str,
        ctx: Context,
        cache: dict[str, list[BCDFrame]],
    ) -> Table:
        """The table refined on the mosaic's BCDs when configured (see ExtractConfig)."""
        from services.extract.multiframe import mosaic_oversamples_frames, refine_source_table
        from services.extract.photometry import MIN_PRF_MISMATCH, mips_band, pixel_scale_arcsec

        mode = self.config.multiframe
        manifest = ref.file("frames")
        if mode == "never" or manifest is None or len(table) == 0:
            return table
        mismatched = float(table.meta.get("PRFMISM", 0.0)) > MIN_PRF_MISMATCH
        if mode == "auto" and not mismatched:
            # One frame's header decides; the others are read only when they will be fitted.
            members = json.loads(await ctx.read(manifest.key))["frames"]
            first = [BCDFrame.from_hdus(await ctx.read_fits(members[0]["key"]))] if members else []
            if not mosaic_oversamples_frames(first, pixel_scale_arcsec(header)):
                return table
        frames = await self._frames(manifest.key, ctx, cache)
        return await ctx.run(
            refine_source_table, table, frames, header, band=mips_band(header, band)
        )

    async def _bandmerge(
        self,
        ref: ProductRef,
        members: dict[int, str],
        ctx: Context,
        cache: dict[str, list[BCDFrame]],
    ) -> None:
        from services.extract.bandmerge import bandmerge
        from services.extract.tables import from_fits_bytes, to_fits_hdulist, to_ipac_bytes

        inst, aor = ref.instrument, int(ref.obs.aorkey or 0)
        lists: dict[str, Table] = {}
        frames_by_band: dict[str, list[BCDFrame]] = {}
        parents = []
        mosaics: dict[str, BCDFrame] = {}
        for i in sorted(members):
            m = json.loads(members[i])
            band = band_name(inst, int(m["channel"]))
            lists[band] = from_fits_bytes(await ctx.read(m["sources"]))
            frames_by_band[band] = await self._frames(m["frames"], ctx, cache)
            if not frames_by_band[band] and m.get("munc"):
                # a post-BCD mosaic without its BCDs: the upper limits are measured on it
                mosaics[band] = await self._mosaic_frame(m, lists[band], ctx)
            parents.append(m["sources"])
        merged: Table = await ctx.run(
            bandmerge, lists, frames_by_band=frames_by_band, nsigma=self.config.upper_limit_sigma,
            mosaics=mosaics,
        )
        version = await ctx.version(f"{inst}.bandmerged.{aor}")
        name = f"SPITZER_{inst[0]}_{aor}_{version}_bandmerged"
        hdul = await ctx.run(to_fits_hdulist, merged, {"AORKEY": aor, "INSTRUME": inst})
        fitsio.add_provenance(hdul[0].header, step="bandmerge", parents=parents)
        await ctx.emit(
            ProductOut(
                instrument=inst,
                level=Level.SOURCES,
                product_type="bandmerged",
                obs=ObsId(aorkey=aor),
                files=[
                    ProductFile("tbl", f"{name}.tbl", await ctx.run(to_ipac_bytes, merged)),
                    ProductFile.fits("fits", f"{name}.fits", hdul),
                ],
                subdir=f"aor{aor}",
                version=version,
                parents=tuple(parents),
                meta={"n_sources": len(merged), "bands": ",".join(lists)},
            )
        )

    async def _mosaic_frame(self, member: dict[str, str], table: Table, ctx: Context
                            ) -> BCDFrame:
        """A mosaic as the one frame of its band's forced photometry: maic, munc x the
        extraction's noise calibration (UNCSCALE), pixels without coverage unusable."""
        image, header = fitsio.image_hdu(await ctx.read_fits(member["maic"]))
        munc = np.asarray(fitsio.image_hdu(await ctx.read_fits(member["munc"]))[0],
                          dtype=np.float32)
        unc = munc * np.float32(table.meta.get("UNCSCALE", 1.0))
        if member.get("mcov"):
            cov = np.asarray(fitsio.image_hdu(await ctx.read_fits(member["mcov"]))[0],
                             dtype=np.float32)
            unc = np.where(cov > 0, unc, np.float32(np.nan))
        data = np.asarray(image, dtype=np.float32)
        return BCDFrame(data=data, unc=unc, mask=np.zeros(data.shape, dtype=np.int16),
                        header=header, key=member["maic"])

    async def _tauvex(self, ref: ProductRef, ctx: Context) -> None:
        from services.extract.tauvex.bandmerge import band_merge
        from services.extract.tauvex.photometry import detect_sources, table_to_fits, table_to_ipac

        scan, tele = ref.obs.scan or 0, ref.obs.telescope or 0
        level2 = await ctx.read_fits(ref.key)
        table: Table = await ctx.run(detect_sources, level2, snr_min=self.config.detect_sigma)
        stem = ref.key.rsplit("/", 1)[-1].removesuffix(".fits")
        hdul = await ctx.run(table_to_fits, table)
        fitsio.add_provenance(hdul[0].header, step="extract", parents=(ref.key,))
        sources = await ctx.emit(
            ProductOut(
                instrument="TAUVEX",
                level=Level.SOURCES,
                product_type="sources",
                obs=ref.obs,
                files=[
                    ProductFile.fits("fits", f"{stem}_sources.fits", hdul),
                    ProductFile("tbl", f"{stem}_sources.tbl", table_to_ipac(table).encode()),
                ],
                subdir=f"scan{scan:04d}",
                version=ref.version,
                parents=(ref.key,),
                meta={"n_sources": len(table), "filter": str(ref.meta.get("filter", ""))},
            )
        )
        if ref.group is None:
            return
        arrival = await ctx.arrive(
            ref.group,
            version=1,
            member_key=json.dumps(
                {"image": ref.key, "sources": sources.key, "filter": ref.meta.get("filter", tele)}
            ),
        )
        if not arrival.trigger:
            return
        images, lists, parents = {}, {}, []
        for i in sorted(arrival.members):
            m = json.loads(arrival.members[i])
            images[str(m["filter"])] = await ctx.read_fits(m["image"])
            lists[str(m["filter"])] = Table.read((await ctx.read_fits(m["sources"]))[1])
            parents.append(m["sources"])
        merged: Table = await ctx.run(
            band_merge, images, lists, ulim_sigma=self.config.upper_limit_sigma
        )
        version = await ctx.version(f"TAUVEX.bandmerged.{scan}")
        name = f"TAUVEX_S{scan:04d}_bandmerged_{version}"
        hdul = await ctx.run(table_to_fits, merged)
        fitsio.add_provenance(hdul[0].header, step="bandmerge", parents=parents)
        await ctx.emit(
            ProductOut(
                instrument="TAUVEX",
                level=Level.SOURCES,
                product_type="bandmerged",
                obs=ObsId(scan=scan),
                files=[
                    ProductFile.fits("fits", f"{name}.fits", hdul),
                    ProductFile("tbl", f"{name}.tbl", table_to_ipac(merged).encode()),
                ],
                subdir=f"scan{scan:04d}",
                version=version,
                parents=tuple(parents),
                meta={"n_sources": len(merged), "filters": ",".join(images)},
            )
        )
        ctx.group_done_after_publish(ref.group.id, 1)

    async def _isocam(self, ref: ProductRef, ctx: Context) -> None:
        """AAR point sources: CMOS + CMAP -> CPSL (FITS, primary) and its IPAC table."""
        from services.extract.isocam.cpsl import extract_sources
        from services.extract.tables import to_ipac_bytes
        from shared.instruments import isocam as ic

        obsnum = str(ref.obs.obsnum)
        cmap_obj = ref.file("cmap")
        if cmap_obj is None:
            raise BadData(f"ISOCAM CMOS {ref.key} has no CMAP companion: no pointing maps")
        cmos = await ctx.read_fits(ref.key)
        cmap = await ctx.read_fits(cmap_obj.key)
        cpsl = await ctx.run(extract_sources, cmos, cmap, snr_threshold=self.config.detect_sigma)
        parents = (ref.key, cmap_obj.key)
        fitsio.add_provenance(cpsl[0].header, step="extract CPSL", parents=parents)
        table = Table.read(cpsl[1])
        version = await ctx.version(f"ISOCAM.cpsl.{obsnum}")
        name = ic.product_name("CPSL", obsnum)
        await ctx.emit(
            ProductOut(
                instrument="ISOCAM",
                level=Level.SOURCES,
                product_type="cpsl",
                obs=ref.obs,
                files=[
                    ProductFile.fits("cpsl", f"{name}.fits", cpsl),
                    ProductFile("tbl", f"{name}.tbl", await ctx.run(to_ipac_bytes, table)),
                ],
                subdir=ic.product_dir(obsnum, version),
                version=version,
                parents=parents,
                meta={"n_sources": len(table), "filter": str(ref.meta.get("filter", ""))},
            )
        )


SERVICE = ExtractService
