"""Ingest: submitted files -> telemetry chunks per observation (or archive products at their level).

Consumes `skybus.input.>` (Submission: files placed in the store). Recognises each file:
MIPS CCSDS telemetry (split per DCE), Spitzer archive FITS (raw or BCD, entered at their
level, grouped per AOR and channel; post-BCD mosaics at the mosaic level, for extraction),
calibration FITS (registered for calibrate), TAUVEX Level 0 + attitude (Level 1
observations), ISOCAM TDF + EOH (one CTDF slice per observation).
Gzip files are decompressed and enter as what they hold, named without ".gz". A file that
cannot be used (unrecognised, truncated, a corrupt header, a BCD without a celestial WCS) is
dead-lettered with the reason; the other files of the submission go on.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated

import msgspec
import numpy as np
from astropy.io import fits

from services.ingest import recognise
from services.ingest.recognise import InputKind
from shared import fitsio
from shared.errors import BadData, Skip
from shared.messages import (
    Envelope,
    Group,
    ObsId,
    StoredObject,
    Submission,
    decode_file_list,
)
from shared.quicklook import quicklook_png
from shared.runtime import Context, ProductFile, ProductOut, Service
from shared.subjects import Level


class IngestConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Ingest parameters (env SKYBUS_INGEST_<FIELD>, or --set field=value); unknown fields are
    an error."""

    #: largest decompressed size of one gzip input, in MiB (a bigger one is dead-lettered)
    max_gunzip_mb: Annotated[int, msgspec.Meta(gt=0)] = 1024


@dataclass(slots=True)
class _Input:
    obj: StoredObject
    name: str  #: the file's name as ingested (".gz" dropped when it was decompressed)
    data: bytes  #: the file's bytes as ingested (decompressed)
    kind: InputKind
    header: fits.Header | None


def _quicklook_of(fits_bytes: bytes, *, title: str) -> bytes | None:
    """Quick-look PNG of a FITS file's image (None when it holds no 2-D image)."""
    with fitsio.open_bytes(fits_bytes) as hdul:
        image, _ = fitsio.image_hdu(hdul)
    if image is None or np.ndim(image) != 2:
        return None
    return quicklook_png(np.asarray(image, dtype=float), title=title)


class IngestService(Service):
    name = "ingest"
    Config = IngestConfig
    config: IngestConfig

    async def handle(self, message: Envelope, ctx: Context) -> None:
        if not isinstance(message, Submission):
            raise Skip(f"ingest takes submissions, not {type(message).__name__}")
        files = message.files
        if message.manifest is not None:
            try:
                files = files + decode_file_list(await ctx.read(message.manifest.key))
            except msgspec.MsgspecError as exc:
                raise BadData(f"submission {message.run_id}: its manifest "
                              f"{message.manifest.key} is not a list of stored files ({exc}); "
                              "submit again") from exc
        inputs: list[_Input] = []
        max_gunzip_bytes = self.config.max_gunzip_mb << 20
        for obj in files:
            data = await ctx.read(obj.key)
            try:
                found = await ctx.run(
                    recognise.recognise, obj.name, data, max_gunzip_bytes=max_gunzip_bytes
                )
            except ValueError as exc:
                ctx.dead_letter(f"{obj.name}: {exc}", item=obj.name)
                continue
            inputs.append(_Input(obj, found.name, found.data, found.kind, found.header))
        by_kind: dict[InputKind, list[_Input]] = defaultdict(list)
        for item in inputs:
            by_kind[item.kind].append(item)
        for item in by_kind[InputKind.CALIBRATION]:
            await self._calibration(item, ctx)
        await self._spitzer_fits(by_kind[InputKind.SPITZER_FITS], ctx)
        for item in by_kind[InputKind.MIPS_TELEMETRY]:
            await self._mips_telemetry(item, ctx)
        await self._tauvex(
            by_kind[InputKind.TAUVEX_LEVEL0], by_kind[InputKind.TAUVEX_ATTITUDE], ctx
        )
        await self._isocam(by_kind[InputKind.ISOCAM_TDF], by_kind[InputKind.ISOCAM_EOH], ctx)

    async def _calibration(self, item: _Input, ctx: Context) -> None:
        header = item.header
        assert header is not None
        instrument = str(header.get("INSTRUME", "UNKNOWN")).upper()
        channel = int(header.get("CHNLNUM", 0))
        caltype = str(header["CALTYPE"]).upper()
        key = f"calibration/{instrument.lower()}/ch{channel}/{recognise.safe_name(item.name)}"
        await ctx.store.put(key, item.data, role="calibration", name=item.name)
        await ctx.calibration.register(instrument, channel, caltype, key)
        ctx.log.info(
            "calibration_registered",
            instrument=instrument,
            channel=channel,
            caltype=caltype,
            key=key,
        )

    async def _spitzer_fits(self, items: list[_Input], ctx: Context) -> None:
        """Archive FITS enter at their level; BCDs are grouped per AOR + channel with their
        uncertainty, mask and filtered-BCD companions (matched by AOR, EXPID, DCENUM). Every
        group carries the AOR's channels of this submission (`aor_channels`), so extract
        band-merges the AOR's bands as it does for telemetry."""
        unique: list[_Input] = []
        seen: dict[str, str] = {}
        for item in items:
            digest = hashlib.sha256(item.data).hexdigest()
            if digest in seen:
                # the same file twice (e.g. x.fits beside x.fits.gz): one copy is enough
                ctx.log.info("duplicate_file_ignored", file=item.obj.name, same_as=seen[digest])
                continue
            seen[digest] = item.obj.name
            unique.append(item)
        sets = recognise.group_spitzer_files([(i.obj.name, i.header) for i in unique])
        by_name = {i.obj.name: i for i in unique}
        for problem in sets.problems:
            ctx.dead_letter(problem.reason, item=problem.name)
        for problem in sets.ignored:
            ctx.log.info("spitzer_product_not_used", file=problem.name, reason=problem.reason)
        if sets.ignored:
            # one line a user sees at the default level: superseded versions, plain bcds beside
            # cbcds, post-BCD mosaics beside their BCDs ... (each file at info level above)
            ctx.log.warning("spitzer_files_not_used", count=len(sets.ignored),
                            first=[p.reason for p in sets.ignored[:3]],
                            hint="not errors: each file and why is logged at info level")
        aor_channels = sets.aor_channels()
        for (instrument, channel, aorkey, level), members in sets.groups.items():
            channels = ",".join(map(str, aor_channels[(instrument, aorkey)]))
            group_id = f"{instrument}-{aorkey}-ch{channel}-{level}"
            for index, member in enumerate(members):
                primary = by_name[member.primary]
                files = [ProductFile(member.kind, primary.name, primary.data)]
                files += [
                    ProductFile(role, by_name[name].name, by_name[name].data)
                    for role, name in member.companions.items()
                ]
                identity = f"{instrument}.{level}.{aorkey}.{channel}.{member.expid}.{member.dcenum}"
                version = await ctx.version(identity)
                await ctx.emit(
                    ProductOut(
                        instrument=instrument,
                        level=Level.CALIBRATED if level == "bcd" else Level.DECODED,
                        product_type="bcd" if level == "bcd" else "raw",
                        obs=ObsId(
                            aorkey=aorkey, channel=channel, expid=member.expid, dcenum=member.dcenum
                        ),
                        files=files,
                        subdir=f"aor{aorkey}/ch{channel}/archive-v{version}",
                        version=version,
                        parents=(primary.obj.key,),
                        group=Group(group_id, index, len(members)),
                        meta={"origin": "archive", "aor_channels": channels},
                    )
                )
        for (instrument, channel, aorkey), roles in sets.mosaics.items():
            await self._post_bcd_mosaic(
                instrument, channel, aorkey, roles, by_name, aor_channels[(instrument, aorkey)],
                ctx,
            )

    async def _post_bcd_mosaic(
        self,
        instrument: str,
        channel: int,
        aorkey: int,
        roles: dict[str, str],
        by_name: dict[str, _Input],
        channels: tuple[int, ...],
        ctx: Context,
    ) -> None:
        """A post-BCD mosaic (maic, with its munc and mcov when given) enters at the mosaic
        level, in the AOR's band-merge group of this submission, as mosaic's own products."""
        maic = by_name[roles["maic"]]
        files = [ProductFile("maic", maic.name, maic.data)]
        files += [ProductFile(role, by_name[roles[role]].name, by_name[roles[role]].data)
                  for role in ("munc", "mcov") if role in roles]
        # a quick-look PNG beside it, as for the mosaics skybus makes
        png = await ctx.run(_quicklook_of, maic.data,
                            title=f"{instrument} ch{channel} AOR {aorkey} (archive)")
        if png is not None:
            png_name = re.sub(r"\.fits(\.fz)?$", ".png", maic.name, flags=re.IGNORECASE)
            files.append(ProductFile("quicklook", png_name, png))
        version = await ctx.version(f"{instrument}.pbcd-archive.{aorkey}.{channel}")
        await ctx.emit(
            ProductOut(
                instrument=instrument,
                level=Level.MOSAICKED,
                product_type="maic",
                obs=ObsId(aorkey=aorkey, channel=channel),
                files=files,
                subdir=f"aor{aorkey}/ch{channel}/archive-v{version}",
                version=version,
                parents=(maic.obj.key,),
                group=Group.aor_mosaics(instrument, aorkey, channel, channels, ctx.run_id),
                meta={"origin": "archive", "aor_channels": ",".join(map(str, channels))},
            )
        )

    async def _mips_telemetry(self, item: _Input, ctx: Context) -> None:
        from services.ingest import mips

        try:
            split = await ctx.run(mips.split_aor_telemetry, item.data)
        except ValueError as exc:
            ctx.dead_letter(f"{item.obj.name}: {exc}", item=item.obj.name)
            return
        for problem in split.problems:
            ctx.dead_letter(f"{item.obj.name}: {problem}", item=item.obj.name)
        counts: dict[tuple[int, int], int] = defaultdict(int)
        for chunk in split.chunks:
            counts[(chunk.aorkey, chunk.channel)] += 1
        index: dict[tuple[int, int], int] = defaultdict(int)
        channels = sorted({c.channel for c in split.chunks})
        for chunk in split.chunks:
            g = (chunk.aorkey, chunk.channel)
            identity = f"MIPS.dce.{chunk.aorkey}.{chunk.channel}.{chunk.expid}.{chunk.dcenum}"
            version = await ctx.version(identity)
            name = (
                f"MIPS_M{chunk.channel}_{chunk.aorkey}_{chunk.expid:04d}_{chunk.dcenum:04d}"
                f"_{version}_dce.tlm"
            )
            await ctx.emit(
                ProductOut(
                    instrument="MIPS",
                    level=Level.TELEMETRY,
                    product_type="dce",
                    obs=ObsId(
                        aorkey=chunk.aorkey,
                        channel=chunk.channel,
                        expid=chunk.expid,
                        dcenum=chunk.dcenum,
                    ),
                    files=[ProductFile("dce", name, chunk.data)],
                    subdir=f"aor{chunk.aorkey}/ch{chunk.channel}",
                    version=version,
                    parents=(item.obj.key,),
                    group=Group(f"MIPS-{chunk.aorkey}-ch{chunk.channel}-dce", index[g], counts[g]),
                    meta={"aor_channels": ",".join(map(str, channels))},
                )
            )
            index[g] += 1

    async def _tauvex(self, level0: list[_Input], attitude: list[_Input], ctx: Context) -> None:
        if not level0 and not attitude:
            return
        if len(attitude) != 1:
            for item in level0 + attitude:
                ctx.dead_letter(
                    f"{item.obj.name}: TAUVEX needs exactly one attitude file beside the Level 0 "
                    f"telemetry in a submission (got {len(attitude)}); submit them together",
                    item=item.obj.name,
                )
            return
        from services.ingest import tauvex

        att = attitude[0]
        for item in level0:
            try:
                result = await ctx.run(tauvex.level0_to_level1, item.data, att.data)
            except ValueError as exc:
                ctx.dead_letter(f"{item.obj.name}: {exc}", item=item.obj.name)
                continue
            for problem in result.problems:
                ctx.dead_letter(f"{item.obj.name}: {problem}", item=item.obj.name)
            for obs in result.observations:
                identity = f"TAUVEX.level1.{obs.obs_id}"
                version = await ctx.version(identity)
                name = f"TAUVEX_L1_{obs.obs_id:04d}_{version}.fits"
                data = await ctx.run(obs.to_bytes)
                await ctx.emit(
                    ProductOut(
                        instrument="TAUVEX",
                        level=Level.TELEMETRY,
                        product_type="level1",
                        obs=ObsId(scan=obs.obs_id),
                        files=[ProductFile("level1", name, data)],
                        subdir=f"scan{obs.obs_id:04d}",
                        version=version,
                        parents=(item.obj.key, att.obj.key),
                    )
                )

    async def _isocam(self, tdfs: list[_Input], eohs: list[_Input], ctx: Context) -> None:
        """TDF_First_Scan: each revolution's TDF, split by the submission's EOH table, becomes
        one CTDF slice (TELEMETRY "tdf") per observation. Defects of the TDF are dead letters;
        the good buffers still go on."""
        if not tdfs and not eohs:
            return
        if len(eohs) != 1:
            for item in tdfs + eohs:
                ctx.dead_letter(
                    f"{item.obj.name}: ISOCAM needs exactly one EOH table (EXTNAME EOHC) beside "
                    f"the TDF of a revolution in a submission (got {len(eohs)}); submit them "
                    "together",
                    item=item.obj.name,
                )
            return
        from services.ingest import isocam
        from shared.instruments import isocam as ic

        eoh = eohs[0]
        for item in tdfs:
            name = item.obj.name
            try:
                result = await ctx.run(isocam.split_tdf, item.data, eoh.data)
            except ValueError as exc:
                ctx.dead_letter(f"{name}: {exc}", item=name)
                continue
            # buffers between observations (slews, idle time) are expected, not a defect
            between = sum(p.count for p in result.problems if p.reason == isocam.HOUSEKEEPING_ONLY)
            ctx.log.info(
                "isocam_tdf",
                file=name,
                revolution=result.revolution,
                buffers=result.n_buffers,
                good=result.n_good,
                between_observations=between,
                observations=len(result.observations),
            )
            for problem in result.problems:
                if problem.reason != isocam.HOUSEKEEPING_ONLY:
                    # one item per reason: dead letters are de-duplicated by (seq, item)
                    ctx.dead_letter(f"{name}: {problem}", item=f"{name} [{problem.reason}]")
            for obs in result.observations:
                if obs.buffers.shape[0] == 0:
                    for problem in obs.problems:
                        ctx.dead_letter(f"{name}: {problem}", item=f"{name} [{obs.obsnum}]")
                    continue
                version = await ctx.version(f"ISOCAM.tdf.{obs.obsnum}")
                data = await ctx.run(obs.to_bytes)
                await ctx.emit(
                    ProductOut(
                        instrument="ISOCAM",
                        level=Level.TELEMETRY,
                        product_type="tdf",
                        obs=ObsId(obsnum=obs.obsnum, revolution=obs.revolution),
                        files=[ProductFile("tdf", f"{obs.name}.fits", data)],
                        subdir=ic.product_dir(obs.obsnum, version),
                        version=version,
                        parents=(item.obj.key, eoh.obj.key),
                        meta={"aot": obs.aot, "object": obs.target},
                    )
                )


SERVICE = IngestService
