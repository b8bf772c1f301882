"""Model and method settings as plain dataclasses, and the two presets.

A bundle stores its ``Config`` in ``bundle.json``; everything the segmenter does is decided
by it, so an old bundle keeps behaving as it was trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from segpc.errors import InputError

PAPER_SCALES = (0.5, 1.75, 2.6, 3.0)
# Published plausibility windows of ratio = cytoplasm area / nucleus area (METHOD.md 6).
PAPER_WINDOWS = {0.5: (0.0, 0.8), 1.75: (0.4, 200.0), 2.6: (0.3, 200.0), 3.0: (0.4, 200.0)}


@dataclass
class NucleusConfig:
    encoder: str = "resnet34"
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    input_size: int = 800  # square; the image is fitted aspect-preserving
    threshold: float = 0.5
    min_area: float = 80.0  # pixels of the image resized to min_area_at x min_area_at
    min_area_at: int = 800  # the paper's input size: 80 px there is 1/8000 of the image
    split_touching: bool = True
    # expected nucleus diameter in pixels of the network's input, what the splitter's markers
    # are scaled to: training measures it on its own data and records it in the bundle
    diameter: float = 30.0


@dataclass
class CytoplasmConfig:
    encoder: str = "tu-xception65"
    aspp_channels: int = 256
    low_level_channels: int = 48
    atrous_rates: tuple[int, int, int] = (6, 12, 18)
    scales: tuple[float, ...] = PAPER_SCALES
    small_input: int = 256  # for scales below size_switch
    large_input: int = 384
    size_switch: float = 1.25
    threshold: float = 0.48
    min_area: float = 10.0
    equalize: bool = False  # per-channel histogram equalisation of the RGB crop


@dataclass
class AggregationConfig:
    """The cascade (METHOD.md 6) and its documented thresholds; see segpc/method/aggregate.py."""

    windows: dict[float, tuple[float, float]] = field(default_factory=lambda: dict(PAPER_WINDOWS))
    min_score: float = 0.9  # the cascade stops only on a candidate at least this sure
    touch_fraction: float = 0.02  # of the crop's in-image edge length
    leap_fraction: float = 0.1  # a cell covering this much of the crop edge skips a scale
    # a kept cell must be at least this sure in both stages (0 = keep all; set by calibration)
    min_nucleus_score: float = 0.0
    min_cell_score: float = 0.0
    mode: str = "cascade"  # "best" (every scale, best kept) or "keep-all" (published submission)


@dataclass
class StainConfig:
    """Stain normalisation (segpc/io/stain.py): every image recoloured to ``reference``, fitted
    on the training split, right after decoding, in training and inference alike."""

    method: str = "none"  # "macenko" | "reinhard" (training's --stain-normalize)
    reference: dict = field(default_factory=dict)


@dataclass
class Config:
    preset: str = "paper"
    nucleus: NucleusConfig = field(default_factory=NucleusConfig)
    cytoplasm: CytoplasmConfig = field(default_factory=CytoplasmConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    stain: StainConfig = field(default_factory=StainConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["aggregation"]["windows"] = {str(k): list(v) for k, v in self.aggregation.windows.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        try:
            agg = dict(d.get("aggregation", {}))
            if "windows" in agg:
                agg["windows"] = {float(k): (float(v[0]), float(v[1])) for k, v in agg["windows"].items()}
            nuc = _tuples(NucleusConfig, d.get("nucleus", {}))
            cyt = _tuples(CytoplasmConfig, d.get("cytoplasm", {}))
            cfg = cls(preset=d.get("preset", "custom"), nucleus=NucleusConfig(**nuc),
                      cytoplasm=CytoplasmConfig(**cyt), aggregation=AggregationConfig(**agg),
                      stain=StainConfig(**d.get("stain", {})))  # older bundles: none
        except (TypeError, ValueError, KeyError, IndexError) as exc:
            raise InputError(f"invalid model configuration: {exc}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        missing = [s for s in self.cytoplasm.scales if s not in self.aggregation.windows]
        if missing:
            raise InputError(f"configuration: no plausibility window for scale(s) {missing}")
        if list(self.cytoplasm.scales) != sorted(self.cytoplasm.scales):
            raise InputError(f"configuration: scales must be ascending, got {self.cytoplasm.scales}")
        if self.aggregation.mode not in ("cascade", "best", "keep-all"):
            raise InputError(f"configuration: unknown aggregation mode {self.aggregation.mode!r}")
        if self.stain.method not in ("none", "macenko", "reinhard"):
            raise InputError(f"configuration: unknown stain normalisation {self.stain.method!r}")
        if self.stain.method != "none" and not self.stain.reference:
            raise InputError(f"configuration: {self.stain.method} stain normalisation without a reference")


def _tuples(kind: type, d: dict) -> dict:
    """JSON turns tuples into lists; restore them for the tuple-typed fields."""
    out = dict(d)
    for f in fields(kind):
        if f.name in out and isinstance(out[f.name], list):
            out[f.name] = tuple(out[f.name])
    return out


def preset(name: str) -> Config:
    """``paper``: the published sizes (GPU). ``tiny``: small networks for CPU tests and demos."""
    if name == "paper":
        return Config(preset="paper")
    if name == "tiny":
        return Config(
            preset="tiny",
            nucleus=NucleusConfig(encoder="tu-mobilenetv3_small_050",
                                  decoder_channels=(64, 32, 16, 16, 8), input_size=320, diameter=10.0),
            cytoplasm=CytoplasmConfig(encoder="tu-mobilenetv3_small_050", aspp_channels=32,
                                      low_level_channels=16, small_input=64, large_input=96),
        )
    raise InputError(f"unknown preset {name!r}; choose 'tiny' or 'paper'")
