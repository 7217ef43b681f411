"""The job's typed configuration: one dataclass schema, YAML + ``key=value`` overrides.

``load_config(path, overrides)`` reads the YAML with ``yaml.safe_load`` (so tags such as
``!!python/object`` are refused), merges it over the :class:`TrainConfig` schema with
OmegaConf (unknown keys and wrong types are refused by their dotted name), applies the
overrides the same way, then runs the range checks below. Everything here happens before
any process group is created or any data is read; every failure is a :class:`ConfigError`
naming the dotted key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

EMBEDDED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config value that cannot run; ``key`` is its dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at {key}: {message}")
        self.key = key


@dataclass
class ModelConfig:
    name: str = "logistic_regression"
    """A built-in model (logistic_regression, hierarchical, vae, gmm) or the user's own,
    as ``package.module:attr`` or ``path/to/file.py:attr``."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the model class (ignored for a plain model function)."""


@dataclass
class GuideConfig:
    name: str = "AutoNormal"
    """An autoguide (AutoNormal, AutoDelta, AutoDiagonalNormal, AutoMultivariateNormal,
    AutoLowRankMultivariateNormal), ``model`` for the model class's own ``guide`` method,
    or ``package.module:attr`` / ``path/to/file.py:attr`` for a guide function."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the autoguide, e.g. ``init_scale``."""


@dataclass
class DataConfig:
    name: str = "breast_cancer"
    """A built-in dataset (breast_cancer, synthetic_hierarchical, digits, synthetic_gmm) or
    a loader ``package.module:attr`` / ``path/to/file.py:attr`` returning a tuple of tensors
    that share their first dimension."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the loader, e.g. ``num_points``."""
    val_fraction: float = 0.2
    """Share of the rows held out for validation, in [0, 1)."""
    loader: str = "memory"
    """``memory``: full tensors and ``plate(subsample_size=batch)``; ``dataloader``: a
    DataLoader with a DistributedSampler passing minibatches and ``plate(subsample=idx)``."""
    split_seed: int = 0
    """Seed of the train/validation split (kept apart from run.seed)."""


@dataclass
class LossConfig:
    name: str = "Trace_ELBO"
    """Trace_ELBO, TraceMeanField_ELBO or TraceGraph_ELBO."""
    num_particles: int = 1
    """Monte-Carlo samples per loss estimate."""
    vectorize_particles: bool = False
    """Draw the particles in one vectorized pass."""
    max_plate_nesting: int | None = None
    """Bound on nested plates (null: found by a trial run)."""


@dataclass
class OptimConfig:
    name: str = "Adam"
    """Adam, ClippedAdam, SGD, AdamW, RMSprop or Adagrad."""
    lr: float = 0.01
    """Learning rate (> 0)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Other optimizer arguments, e.g. ``betas`` or ``weight_decay``."""
    per_param: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Overrides by param-name prefix, e.g. ``{"AutoNormal.scales": {lr: 0.001}}``."""
    clip_norm: float | None = None
    """Clip the global gradient norm (after the cross-rank average) to this value."""


@dataclass
class ScheduleConfig:
    name: str = "none"
    """none, exponential (gamma), step (step_size, gamma) or cosine (T_max)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Arguments of the torch scheduler, e.g. ``gamma: 0.999``."""
    every: int = 1
    """Step the scheduler once every this many training steps."""


@dataclass
class RunConfig:
    steps: int = 1000
    """Training steps; 0 to count in epochs instead."""
    epochs: int = 0
    """Passes over the training rows (used when steps is 0)."""
    batch_size: int = 64
    """Rows per step on each rank."""
    seed: int = 0
    """Run seed: rank 0 draws its Monte-Carlo noise from it, other ranks from seeds derived
    from it and their rank; the data shuffle of each epoch derives from it too."""
    val_every: int = 100
    """Validate every this many steps (and at the end)."""
    log_every: int = 10
    """Write scalars and a progress line every this many steps."""
    progress: str = "auto"
    """auto (bar on a terminal, log lines otherwise), bar, log or none."""
    device: str = "auto"
    """auto (the local GPU when there is one), cpu or cuda."""
    threads: int = 0
    """CPU threads per process for torch (0: torch's default, which follows
    ``OMP_NUM_THREADS``); small models run fastest on 1."""


@dataclass
class CheckpointConfig:
    dir: str = "runs/default/checkpoints"
    """Where rank 0 writes ``step_*.pt`` files and the resolved ``config.yaml``."""
    every: int = 100
    """Save every this many steps (and at the end); 0 saves only at the end."""
    keep: int = 3
    """Keep the newest this many checkpoint files (2 or more, so that a good one remains if
    the newest turns out unreadable)."""
    resume: str = "auto"
    """auto (newest checkpoint that loads), never, or the path of a checkpoint file."""


@dataclass
class LogConfig:
    dir: str = "runs/default/tb"
    """TensorBoard event directory (rank 0 only)."""


@dataclass
class PredictConfig:
    num_samples: int = 100
    """Posterior predictive samples for the end-of-run report and ``distsvi predict``."""


@dataclass
class DistConfig:
    backend: str = "auto"
    """auto (nccl with CUDA, else gloo), gloo or nccl."""
    timeout_s: int = 600
    """Seconds a collective waits for the other ranks before failing."""
    bucket_cap_mb: float = 25.0
    """Size of a gradient all-reduce bucket, in MiB."""
    pin_cpus: bool = False
    """On CPU, give each rank of a node cores of its own (cores // ranks per node)."""


@dataclass
class TrainConfig:
    name: str = "default"
    """The job's name (for people; directories are set in checkpoint.dir and log.dir)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    dist: DistConfig = field(default_factory=DistConfig)


BUILTIN_MODELS = ("logistic_regression", "hierarchical", "vae", "gmm")
BUILTIN_DATA = ("breast_cancer", "synthetic_hierarchical", "digits", "synthetic_gmm")
AUTOGUIDES = (
    "AutoNormal",
    "AutoDelta",
    "AutoDiagonalNormal",
    "AutoMultivariateNormal",
    "AutoLowRankMultivariateNormal",
)
LOSSES = ("Trace_ELBO", "TraceMeanField_ELBO", "TraceGraph_ELBO")
OPTIMIZERS = ("Adam", "ClippedAdam", "SGD", "AdamW", "RMSprop", "Adagrad")
SCHEDULES = ("none", "exponential", "step", "cosine")


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path, or the name of a config shipped in the package (``quickstart``)."""
    path = Path(spec)
    if path.is_file():
        return path
    embedded = EMBEDDED_CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if path.parent == Path(".") and embedded.is_file():
        return embedded
    shipped = ", ".join(sorted(p.stem for p in EMBEDDED_CONFIGS.glob("*.yaml")))
    raise ConfigError(
        "CONFIG", f"no file {str(spec)!r} (configs shipped in the package: {shipped})"
    )


def load_config(
    spec: str | Path, overrides: Sequence[str] = (), world_size: int | None = None
) -> TrainConfig:
    """Read, merge, type-check and range-check a job config.

    :param spec: a YAML file, or the name of a shipped config such as ``quickstart``.
    :param overrides: dotted ``key=value`` strings, e.g. ``["optim.lr=0.003"]``.
    :param world_size: ranks the job will run on (default: ``WORLD_SIZE`` or 1), for the
        check that a batch fits in each rank's rows.
    :returns: the checked :class:`TrainConfig`.
    :raises ConfigError: naming the dotted key, for anything that cannot run.

    Example::

        cfg = load_config("configs/quickstart.yaml", ["run.steps=500"])
    """
    path = resolve_config_path(spec)
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.constructor.ConstructorError:
        key, tag = _unsafe_tag(text)
        raise ConfigError(
            key, f"the YAML tag {tag!r} is refused: configs hold plain values only"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {_first_line(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            "<top>", f"{path} must hold a mapping of sections, not {type(raw).__name__}"
        )
    _check_sections(raw, TrainConfig, "")
    dotlist = [_check_override(o) for o in overrides]
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(TrainConfig),
            OmegaConf.create(raw),
            OmegaConf.from_dotlist(dotlist),
        )
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(e.full_key or "<top>", _first_line(e)) from None
    assert isinstance(cfg, TrainConfig)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_ranges(cfg, base_dir=path.parent, world_size=world_size)
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what checkpoints and TensorBoard store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> TrainConfig:
    """The inverse of :func:`to_yaml` (for configs read back from a checkpoint)."""
    merged = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), OmegaConf.create(yaml.safe_load(text))
    )
    return OmegaConf.to_object(merged)


def _unsafe_tag(text: str) -> tuple[str, str]:
    """The dotted key and tag of the first node that ``yaml.safe_load`` cannot build."""
    known = yaml.SafeLoader.yaml_constructors

    def walk(node: yaml.Node, key: str) -> tuple[str, str] | None:
        if node.tag not in known:
            return key or "<top>", node.tag
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                found = walk(v, f"{key}.{k.value}" if key else str(k.value))
                if found:
                    return found
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                found = walk(v, f"{key}[{i}]")
                if found:
                    return found
        return None

    return walk(yaml.compose(text), "") or ("<top>", "?")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _check_sections(raw: dict, schema: type, prefix: str) -> None:
    # OmegaConf reports "section: 3" without a key name; catch that shape error here.
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name in raw and dataclasses.is_dataclass(f.default_factory):
            value = raw[f.name]
            if value is not None and not isinstance(value, dict):
                raise ConfigError(key, f"must be a mapping of options, got {value!r}")
            if value:
                _check_sections(value, f.default_factory, f"{key}.")


def _check_override(text: str) -> str:
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, "overrides are written key=value, e.g. optim.lr=0.003")
    return text


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def import_target(spec: str, key: str, base_dir: Path = Path(".")) -> tuple[str, Any]:
    """Import ``package.module:attr`` or ``path/to/file.py:attr``.

    :returns: the spec with a file path made to work from the working directory, and the
        object it names.
    :raises ConfigError: naming ``key`` when the file is missing or does not import.
    """
    module, sep, attr = spec.rpartition(":")
    _require(
        bool(sep and module and attr),
        key,
        f"{spec!r} is neither a built-in name nor package.module:attr / path/to/file.py:attr",
    )
    try:
        if module.endswith(".py"):
            found = [p for p in (Path(module), base_dir / module) if p.is_file()]
            _require(
                bool(found),
                key,
                f"file {module!r} does not exist (relative paths are tried from the working "
                "directory and from the config's directory)",
            )
            spec = f"{found[0]}:{attr}"
            name = f"distsvi_user_{found[0].stem}_{abs(hash(str(found[0].resolve())))}"
            if name not in sys.modules:
                loader_spec = importlib.util.spec_from_file_location(name, found[0])
                mod = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = mod
                try:
                    loader_spec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[name]
                    raise
            mod = sys.modules[name]
        else:
            mod = importlib.import_module(module)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, report it under the key
        raise ConfigError(
            key, f"{module!r} does not import: {type(e).__name__}: {_first_line(e)}"
        ) from None
    _require(hasattr(mod, attr), key, f"{module!r} has no attribute {attr!r}")
    return spec, getattr(mod, attr)


def check_ranges(cfg: TrainConfig, base_dir: Path = Path("."), world_size: int = 1) -> None:
    """Refuse values that type-check but cannot run (torchtitan's ``__post_init__`` checks)."""
    r, c, o = cfg.run, cfg.checkpoint, cfg.optim
    for key, value in [
        ("run.batch_size", r.batch_size),
        ("run.val_every", r.val_every),
        ("run.log_every", r.log_every),
        ("checkpoint.keep", c.keep),
        ("loss.num_particles", cfg.loss.num_particles),
        ("predict.num_samples", cfg.predict.num_samples),
        ("schedule.every", cfg.schedule.every),
        ("dist.timeout_s", cfg.dist.timeout_s),
    ]:
        _require(value > 0, key, f"must be > 0, got {value}")
    _require(r.steps >= 0, "run.steps", f"must be >= 0, got {r.steps}")
    _require(r.epochs >= 0, "run.epochs", f"must be >= 0, got {r.epochs}")
    _require(r.steps > 0 or r.epochs > 0, "run.steps", "set run.steps > 0 or run.epochs > 0")
    _require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0: only at the end), got {c.every}")
    _require(r.seed >= 0, "run.seed", f"must be >= 0, got {r.seed}")
    _require(r.threads >= 0, "run.threads", f"must be >= 0 (0: torch's default), got {r.threads}")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", "must be > 0 or null")
    _require(
        o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}"
    )
    _require(
        cfg.loss.name in LOSSES, "loss.name", f"{cfg.loss.name!r} is not one of {', '.join(LOSSES)}"
    )
    _require(
        cfg.schedule.name in SCHEDULES,
        "schedule.name",
        f"{cfg.schedule.name!r} is not one of {', '.join(SCHEDULES)}",
    )
    _require(
        0.0 <= cfg.data.val_fraction < 1.0,
        "data.val_fraction",
        f"must be in [0, 1), got {cfg.data.val_fraction}",
    )
    _require(
        cfg.data.loader in ("memory", "dataloader"),
        "data.loader",
        f"must be memory or dataloader, got {cfg.data.loader!r}",
    )
    _require(
        r.progress in ("auto", "bar", "log", "none"),
        "run.progress",
        f"must be auto, bar, log or none, got {r.progress!r}",
    )
    _require(
        r.device in ("auto", "cpu", "cuda"),
        "run.device",
        f"must be auto, cpu or cuda, got {r.device!r}",
    )
    _require(
        cfg.dist.backend in ("auto", "gloo", "nccl"),
        "dist.backend",
        f"must be auto, gloo or nccl, got {cfg.dist.backend!r}",
    )
    _require(cfg.dist.bucket_cap_mb > 0, "dist.bucket_cap_mb", "must be > 0")
    _require(bool(cfg.name.strip()), "name", "must not be empty")
    _require(
        not (o.name == "ClippedAdam" and cfg.schedule.name != "none"),
        "schedule.name",
        "ClippedAdam decays its own rate (optim.options.lrd); use schedule.name: none",
    )
    if c.resume not in ("auto", "never"):
        _require(
            Path(c.resume).is_file(),
            "checkpoint.resume",
            f"must be auto, never or an existing checkpoint file, got {c.resume!r}",
        )
    _check_targets(cfg, base_dir)
    num_rows = builtin_num_rows(cfg.data.name, cfg.data.options)
    if num_rows is not None:
        _require(num_rows > 0, "data.options.num_points", f"must be > 0, got {num_rows}")
        check_batch(cfg, num_rows, world_size)
    for prefix, options in o.per_param.items():
        _require(isinstance(options, dict), f"optim.per_param.{prefix}", "must be a mapping")
        lr = options.get("lr", o.lr)
        _require(
            isinstance(lr, (int, float)) and lr > 0,
            f"optim.per_param.{prefix}.lr",
            f"must be > 0, got {lr}",
        )


def _check_targets(cfg: TrainConfig, base_dir: Path) -> None:
    """Model, data and guide names resolve, and their options are arguments they take."""
    from distsvi.infer import autoguide  # the engine, only once the config parsed
    from distsvi.train.data import LOADERS
    from distsvi.train.models import BUILTIN

    model = BUILTIN.get(cfg.model.name)
    if model is None:
        cfg.model.name, model = import_target(cfg.model.name, "model.name", base_dir)
    if isinstance(model, type):
        _check_options(model, cfg.model.options, "model.options")
    loader = LOADERS.get(cfg.data.name)
    if loader is None:
        cfg.data.name, loader = import_target(cfg.data.name, "data.name", base_dir)
    _check_options(loader, cfg.data.options, "data.options")
    if cfg.guide.name in AUTOGUIDES:
        _check_options(getattr(autoguide, cfg.guide.name), cfg.guide.options, "guide.options")
    elif cfg.guide.name != "model":
        cfg.guide.name, _ = import_target(cfg.guide.name, "guide.name", base_dir)


def _check_options(fn: Any, options: dict[str, Any], key: str) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # not introspectable: the call will tell
    try:
        signature.bind_partial(**options)
    except TypeError as e:
        name = getattr(fn, "__name__", str(fn))
        allowed = ", ".join(p for p in signature.parameters if p not in ("self", "model"))
        raise ConfigError(key, f"{e} (options of {name}: {allowed or 'none'})") from None


def builtin_num_rows(name: str, options: dict[str, Any]) -> int | None:
    """Rows of a built-in dataset, known without loading it (None for user loaders)."""
    fixed = {"breast_cancer": 569, "digits": 1797}
    if name in fixed:
        return fixed[name]
    if name in ("synthetic_hierarchical", "synthetic_gmm"):
        num = options.get("num_points", 100_000 if name == "synthetic_hierarchical" else 3000)
        _require(
            isinstance(num, int) and not isinstance(num, bool),
            "data.options.num_points",
            f"must be an integer, got {num!r}",
        )
        return num
    return None


def check_batch(cfg: TrainConfig, num_rows: int, world_size: int) -> None:
    """The batch must fit in each rank's share of the training rows."""
    train_rows = num_rows - round(num_rows * cfg.data.val_fraction)
    per_rank = train_rows // world_size
    _require(
        cfg.run.batch_size <= per_rank,
        "run.batch_size",
        f"must be <= {per_rank}, the training rows per rank ({train_rows} rows of "
        f"{cfg.data.name} after data.val_fraction={cfg.data.val_fraction}, {world_size} rank(s)); "
        f"got {cfg.run.batch_size}",
    )
