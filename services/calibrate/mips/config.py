"""The frozen, documented parameters of the MIPS calibration steps."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True, slots=True, kw_only=True)
class MipsCalibrateConfig:
    """Parameters of MIPS raw -> BCD calibration (units in the names).

    Detector noise (`*_read_noise_dn`, `*_gain_e_per_dn`) is used only for the uncertainty
    plane (and the Ge jump threshold floor); a raw header carrying RONOISE (DN per sample) or
    GAIN (e-/DN) overrides it. The defaults are the detector model of `simulator.mips`.
    """

    #: DCENUM 0 response depression (first-frame effect), fraction (seed 001: 10-15%).
    first_dce_depression: float = 0.12
    #: DCENUM 1 and 2 response depression, fraction (seed 001: ~2%).
    early_dce_depression: float = 0.02
    #: 24 um read noise per sample, DN.
    si_read_noise_dn: float = 5.0
    #: 24 um gain, electrons per DN (Poisson term of the uncertainty).
    si_gain_e_per_dn: float = 5.0
    #: Ge read noise per sample, DN.
    ge_read_noise_dn: float = 3.0
    #: Ge gain, electrons per DN.
    ge_gain_e_per_dn: float = 2.0
    #: Fractional 1-sigma uncertainty of the flat, used when the FLAT file has no UNC plane.
    flat_unc_frac: float = 0.003
    #: 1-sigma uncertainty of the dark, DN/s, used when the DARK file has no UNC plane.
    dark_unc_dn_s: float = 0.02
    #: 24 um: a ramp whose predicted last sample exceeds this fraction of SATLEVEL is treated
    #: as saturated and its slope replaced by the first difference.
    saturation_fraction: float = 0.95
    #: 24 um cosmic rays: minimum excess over the local background, in sigma of the background
    #: uncertainty.
    cr_nsigma: float = 4.5
    #: 24 um cosmic rays: minimum ratio of a pixel's excess to its brightest direct neighbour's
    #: excess. A pixel-integrated PSF of FWHM 2.3 px gives at most ~1.6, so 2.2 keeps the cores
    #: of real point sources unflagged.
    cr_neighbour_ratio: float = 2.2
    #: 24 um cosmic rays: side of the median box that estimates the local background, pixels.
    cr_background_box_px: int = 9
    #: Ge ramps: a first difference above the pixel's median difference by more than this many
    #: robust sigma is a cosmic-ray jump and is left out of the slope. Not lower: read noise
    #: makes neighbouring differences anticorrelated, so a false jump leaves a step of the
    #: read-noise size in the cleaned ramp and biases the slope.
    jump_nsigma: float = 5.0
    #: Ge: minimum stim-minus-background responsivity ratio accepted as a valid stim
    #: measurement (DN/s per instrument unit, before the flat); smaller or negative values are
    #: rejected and nearest-in-time responsivity is used.
    min_responsivity: float = 1e-3
    #: Ge fbcd: subtract the per-pixel temporal median of the group.
    fbcd_temporal_median: bool = True
    #: Ge fbcd: then subtract each column's median.
    fbcd_column_median: bool = True

    def __post_init__(self) -> None:
        for name in ("first_dce_depression", "early_dce_depression"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"MipsCalibrateConfig.{name} must be in [0, 1), got {value}")
        for name in (
            "si_read_noise_dn",
            "si_gain_e_per_dn",
            "ge_read_noise_dn",
            "ge_gain_e_per_dn",
            "cr_nsigma",
            "cr_neighbour_ratio",
            "jump_nsigma",
            "saturation_fraction",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"MipsCalibrateConfig.{name} must be > 0, got {getattr(self, name)}"
                )
        if self.flat_unc_frac < 0 or self.dark_unc_dn_s < 0:
            raise ValueError("MipsCalibrateConfig flat_unc_frac and dark_unc_dn_s must be >= 0")
        if self.cr_background_box_px < 3 or self.cr_background_box_px % 2 == 0:
            raise ValueError(
                "MipsCalibrateConfig.cr_background_box_px must be odd and >= 3, "
                f"got {self.cr_background_box_px}"
            )

    def as_dict(self) -> dict[str, float | int | bool]:
        """All parameters by name (for the HISTORY record)."""
        return asdict(self)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
