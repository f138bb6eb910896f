"""The run configuration: one validated object from a YAML file and CLI flags.

Every setting has a default, so ``python -m audit run`` with no config audits
the built-in MNIST test set with the latest stored model. A YAML file sets any
subset of the keys below; flags given on the command line override the file.
Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from .analysis import StatisticsSettings
from .findings import FindingRule, default_rules
from .slices import SliceSettings

SEVERITIES = ("low", "medium", "high")


class ConfigError(ValueError):
    """A config file or flag that cannot be used; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


def _square(value):
    """``6`` means ``(6, 6)`` for window and stride, as on the command line."""
    return (value, value) if isinstance(value, int) else value


Size = Annotated[tuple[PositiveInt, PositiveInt], BeforeValidator(_square)]


class DatasetConfig(_Strict):
    """Which images to audit.

    ``kind: mnist`` is the built-in MNIST ``split``; ``kind: manifest`` reads
    ``manifest`` (CSV or Parquet with ``path``, ``label`` and attribute columns)
    relative to ``image_root``. ``every`` keeps every k-th row (a spread-out
    sample), ``limit`` then keeps the first N of those; ``repeat`` audits the
    rows that many times (for scale tests).
    """

    kind: Literal["mnist", "manifest"] = "mnist"
    split: Literal["test", "train"] = "test"
    manifest: Path | None = None
    image_root: Path | None = None
    every: PositiveInt = 1
    limit: PositiveInt | None = None
    repeat: PositiveInt = 1

    @model_validator(mode="after")
    def _manifest_needs_paths(self):
        if self.kind == "manifest" and (
            self.manifest is None or self.image_root is None
        ):
            raise ValueError("kind 'manifest' needs both 'manifest' and 'image_root'")
        return self


class OcclusionConfig(_Strict):
    """Windows, baseline and target of the occlusion (see audit.occlusion)."""

    window: Size = (6, 6)
    stride: Size = (4, 4)
    baseline: Literal["constant", "image_mean", "blur", "dataset_mean"] = "constant"
    baseline_value: float = 0.0
    target: Literal["predicted", "label"] = "predicted"
    output: Literal["probability", "log_probability", "logit"] = "probability"
    max_batch: Annotated[int, Field(gt=0, le=65536)] = 1024


class FaithfulnessConfig(_Strict):
    """Deletion/insertion curves: ``steps`` per curve on every ``every``-th image."""

    enabled: bool = True
    steps: Annotated[int, Field(ge=2, le=100)] = 8
    every: PositiveInt = 1


class EndpointConfig(_Strict):
    """Limits for auditing a running Bento over HTTP."""

    url: str | None = None
    max_in_flight: Annotated[int, Field(gt=0, le=64)] = 2
    max_requests_per_second: float | None = Field(default=None, gt=0)
    timeout_seconds: float = Field(default=60.0, gt=0)
    retries: Annotated[int, Field(ge=0, le=10)] = 3
    auth_env: str | None = None

    @model_validator(mode="after")
    def _url_scheme(self):
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint url {self.url!r} must start with http(s)://")
        return self


class AuditConfig(_Strict):
    """Everything one audit run needs.

    ``slices`` left out means: every attribute column of the dataset, plus the
    derived image attributes (brightness, contrast, ink area, and for
    single-channel images stroke thickness and slant) in quartiles, plus
    each attribute column crossed with stroke thickness. ``statistics.seed``
    seeds every resampling test. ``regions`` names extra mask files (``.npy``
    or an image, nonzero inside, image-sized) whose share of attribution is
    reported per slice as ``region_share.<name>`` beside the built-in border,
    centre and quadrants; rules may judge them. The merged statistics are
    checkpointed at most every ``checkpoint_seconds`` (0: after every chunk)
    and when a run fails; a checkpoint rewrites every image's scalars, so on
    millions of images it should not be written after every chunk.
    """

    model: str = "mnist_cnn:latest"
    endpoint: EndpointConfig = EndpointConfig()
    dataset: DatasetConfig = DatasetConfig()
    occlusion: OcclusionConfig = OcclusionConfig()
    faithfulness: FaithfulnessConfig = FaithfulnessConfig()
    slices: SliceSettings | None = None
    statistics: StatisticsSettings = StatisticsSettings()
    rules: list[FindingRule] = Field(default_factory=default_rules)
    regions: dict[str, Path] = Field(default_factory=dict)
    output: Path = Path("runs")
    run_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
    )
    fail_on: Literal["low", "medium", "high", "never"] = "high"
    chunk_size: Annotated[int, Field(gt=0, le=1_000_000)] = 2048
    checkpoint_seconds: float = Field(default=30.0, ge=0)
    dask: str | None = None


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        value = item.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {key}: {item['msg']}{shown}")
    return "\n".join(lines)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict:
    """The mapping in a YAML config file; errors name the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of keys, got {type(data).__name__}"
        )
    return data


def load_config(path: Path | None = None, overrides: dict | None = None) -> AuditConfig:
    """Validate a YAML file (optional) with ``overrides`` (nested dict) on top."""
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, overrides or {})
    try:
        return AuditConfig.model_validate(data)
    except ValidationError as e:
        source = f"config file {path}" if path is not None else "the configuration"
        raise ConfigError(f"{source} is not valid:\n{_describe(e)}") from e


def config_dict(config: AuditConfig) -> dict:
    """The config as plain JSON-able data (for results.json and checkpoints)."""
    return config.model_dump(mode="json")
