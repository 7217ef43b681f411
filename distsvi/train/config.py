"""The job's typed configuration: one dataclass schema, YAML + ``key=value`` overrides.

``load_config(path, overrides)`` reads the YAML with a safe loader that also refuses
duplicate keys, aliases that expand beyond a small size, deep nesting and large files;
merges it over the :class:`TrainConfig` schema with OmegaConf (unknown keys and wrong
types are refused by their dotted name), applies the overrides the same way, then runs
the checks below: ranges, directories, memory, and the named model, data, guide,
optimizer and scheduler against their signatures. Everything happens before any process
group is created or anything is written; every failure is a :class:`ConfigError` naming
the dotted key (or the file) and what to do.

The built-in names live in :mod:`distsvi.train.names`, the error type and the import of
user targets in :mod:`distsvi.train.errors`; both load without torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import os
import socket
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distsvi.train.errors import ConfigError, first_line, import_target, require
from distsvi.train.names import (
    AUTOGUIDES,
    BUILTIN_DATA,
    BUILTIN_MODELS,
    LOSSES,
    OPTIMIZERS,
    SCHEDULERS,
    SCHEDULES,
    builtin_bytes,
    builtin_num_rows,
)

__all__ = [
    "ConfigError",
    "TrainConfig",
    "check_batch",
    "diff_configs",
    "from_yaml",
    "import_target",
    "load_config",
    "to_yaml",
]

EMBEDDED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
MAX_FILE_BYTES = 1 << 20  # a config is a page of text; anything larger is a mistake
MAX_DEPTH = 16  # sections, options and their values
MAX_NODES = 10_000  # YAML nodes after expanding aliases (an alias bomb is refused here)
MAX_TIMEOUT_S = 7 * 24 * 3600


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
    local_updates: str = "lazy"
    """lazy (only the rows of the step's batch and their optimizer state advance: a step
    costs its batch, not the data) or dense (every row of a local param steps every step,
    Pyro's numbers)."""


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
    max_bad_steps: int = 10
    """Steps with a non-finite loss or gradient are skipped; this many in a row stop the
    run (exit code 1, naming the first non-finite site)."""
    compile: str = "false"
    """Run training steps through ``torch.compile`` (``SVI(compile=True)``): false, true, or
    auto, which compiles when the run has at least ``COMPILE_AUTO_MIN_STEPS`` steps (a
    compile costs tens of seconds and a compiled step saves a fraction of a millisecond,
    so only long runs repay it). The results are the eager ones (to float round-off)."""


# run.compile=auto compiles runs of at least this many steps. Measured with
# benchmarks/compile_payoff.py on the shipped configs (2-core CPU, one thread, a cold
# compile cache): the compile costs 12-15 s and a compiled step is 1.5-3.1x faster, which
# repays the compile after 8,800-18,100 steps; the threshold leaves a margin for models
# that gain less.
COMPILE_AUTO_MIN_STEPS = 25_000


def compiles(run: RunConfig, total_steps: int) -> bool:
    """Whether a run of ``total_steps`` steps runs compiled under ``run.compile``."""
    mode = run.compile.lower()
    return mode == "true" or (mode == "auto" and total_steps >= COMPILE_AUTO_MIN_STEPS)


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
    shared_memory: str = "auto"
    """On CPU, average gradients through /dev/shm segments that the ranks of one machine
    all map instead of Gloo's TCP all-reduce: auto (when every rank can map every other's;
    off x86 only gradients too large for Gloo to gather in one bucket), true or false.
    Ranks on several machines use Gloo either way."""
    local_params: str = "sharded"
    """sharded (rank r stores and updates only its own block of the rows of local params,
    which never enter the all-reduce, and holds only that block of the in-memory training
    rows) or replicated (every rank holds every row)."""


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


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path, or the name of a config shipped in the package (``quickstart``)."""
    path = Path(spec)
    if path.is_file():
        return path
    embedded = EMBEDDED_CONFIGS / (path.name if path.suffix else f"{path.name}.yaml")
    if path.parent == Path(".") and embedded.is_file():
        return embedded
    shipped = ", ".join(sorted(p.stem for p in EMBEDDED_CONFIGS.glob("*.yaml")))
    if path.exists():
        raise ConfigError("CONFIG", f"{str(spec)!r} is not a file (give a YAML config file)")
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
    raw = read_yaml(path)
    _check_sections(raw, TrainConfig, "")
    with _omegaconf_errors(str(path)):
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.create(raw))
    for override in overrides:  # one at a time, so that a failure names its key
        key = _check_override(override)
        with _omegaconf_errors(key):
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([override]))
    with _omegaconf_errors(str(path)):
        _check_sections(OmegaConf.to_container(merged, resolve=True), TrainConfig, "")
        cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, TrainConfig)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_ranges(cfg, base_dir=path.parent, world_size=world_size)
    return cfg


# -- reading YAML --------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds nesting while composing (a 10,000-deep list would
    otherwise end in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise ConfigError(
                    self.name,
                    f"nested deeper than {MAX_DEPTH} levels (line {mark.line + 1}); a config "
                    "holds sections of plain values",
                )
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, refused (:class:`ConfigError` naming the file or key)
    when it is not UTF-8 text, too large, empty, holds tags other than plain values,
    repeats a key, expands aliases beyond :data:`MAX_NODES` nodes or nests too deep."""
    name = str(path)
    size = path.stat().st_size
    require(
        size <= MAX_FILE_BYTES,
        name,
        f"is {size} bytes, over the {MAX_FILE_BYTES}-byte limit of a config file",
    )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            name, f"is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); save it as UTF-8"
        ) from None
    loader = _Loader(text)
    loader.name = name
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                name,
                "is empty: a config names at least the model and data, e.g. start from "
                "`distsvi config quickstart > job.yaml`",
            )
        _check_nodes(node, name)
        raw = loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or first_line(e)
        raise ConfigError(name, f"not valid YAML{where}: {problem}; fix that line") from None
    finally:
        loader.dispose()
    require(
        isinstance(raw, dict),
        name,
        f"must hold a mapping of sections (name:, model:, data:, run: ...), not a "
        f"{type(raw).__name__}; see `distsvi config quickstart`",
    )
    return raw


def _check_nodes(root: yaml.Node, name: str) -> None:
    """Refuse alias bombs, tags that are not plain values and repeated keys, naming them."""
    known = yaml.SafeLoader.yaml_constructors
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:  # nodes after expanding aliases, counted once each
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a recursive alias counts as small here, refused below
            children = node.value if isinstance(node, yaml.SequenceNode) else []
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            sizes[id(node)] = 1 + sum(size(c) for c in children)
        return sizes[id(node)]

    total = size(root)
    require(
        total <= MAX_NODES,
        name,
        f"expands to {total} YAML nodes through its aliases (&anchor / *alias), over the "
        f"limit of {MAX_NODES}; write the values out",
    )

    def walk(node: yaml.Node, key: str, seen: tuple[int, ...]) -> None:
        require(id(node) not in seen, key or name, "a YAML alias refers to itself")
        where = key or "<top>"
        require(
            node.tag in known,
            where,
            f"the YAML tag {node.tag!r} is refused: configs hold plain values only",
        )
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for k, v in node.value:
                sub = f"{key}.{k.value}" if key else str(k.value)
                require(
                    k.value not in keys or k.value == "<<",
                    sub,
                    f"the key appears twice in this mapping (line {k.start_mark.line + 1}); "
                    "keep one",
                )
                keys.add(k.value)
                walk(v, sub, (*seen, id(node)))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, f"{key}[{i}]", (*seen, id(node)))

    walk(root, "", ())


def to_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML text (what checkpoints and TensorBoard store)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> TrainConfig:
    """The inverse of :func:`to_yaml` (for configs read back from a checkpoint)."""
    merged = OmegaConf.merge(
        OmegaConf.structured(TrainConfig), OmegaConf.create(yaml.safe_load(text))
    )
    return OmegaConf.to_object(merged)


# Keys that may change between a checkpoint and the job resuming from it: they take
# effect. Any other change makes the checkpoint inapplicable (another model, guide, data,
# loss, batch or seed). Optimizer hyper-parameters are safe without a schedule (with one,
# the saved schedule state pins the rate).
SAFE_ON_RESUME = (
    "name",
    "run.steps",
    "run.epochs",
    "run.val_every",
    "run.log_every",
    "run.progress",
    "run.device",
    "run.threads",
    "run.max_bad_steps",
    "run.compile",
    "optim.clip_norm",
    "checkpoint.dir",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.resume",
    "log.dir",
    "predict.num_samples",
    "dist.backend",
    "dist.timeout_s",
    "dist.bucket_cap_mb",
    "dist.pin_cpus",
    "dist.local_params",
    "dist.shared_memory",
)
OPTIM_HYPERPARAMETERS = ("optim.lr", "optim.options", "optim.per_param")


def diff_configs(old: TrainConfig, new: TrainConfig) -> tuple[list[tuple], list[tuple]]:
    """The keys that differ, as ``(key, old value, new value)``: those that make a
    checkpoint of ``old`` inapplicable to ``new``, and those that are safe to change."""
    a, b = _flat(old), _flat(new)
    safe_keys = set(SAFE_ON_RESUME)
    if new.schedule.name == "none" and old.schedule.name == "none":
        safe_keys.update(OPTIM_HYPERPARAMETERS)
    unsafe, safe = [], []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            (safe if key in safe_keys else unsafe).append((key, a.get(key), b.get(key)))
    return unsafe, safe


def _flat(cfg: TrainConfig) -> dict[str, Any]:
    """``section.key -> value`` (option mappings compared whole)."""
    out = {}
    for section, value in OmegaConf.to_container(OmegaConf.structured(cfg)).items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def _check_sections(raw: dict, schema: type, prefix: str) -> None:
    # OmegaConf reports "section: 3" without a key name, and lets a list through where a
    # mapping of options is declared; catch both here.
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if f.name not in raw or raw[f.name] is None:
            continue
        value = raw[f.name]
        if dataclasses.is_dataclass(f.default_factory):
            require(isinstance(value, dict), key, f"must be a mapping of options, got {value!r}")
            _check_sections(value, f.default_factory, f"{key}.")
        elif str(f.type).startswith("dict"):
            require(
                isinstance(value, dict),
                key,
                f"must be a mapping (name: value), got {type(value).__name__} {value!r}",
            )
            if f.name == "per_param":
                for k, v in value.items():
                    require(isinstance(v, dict), f"{key}.{k}", f"must be a mapping, got {v!r}")


def _check_override(text: str) -> str:
    """The key of a ``key=value`` override."""
    key, sep, _ = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, "overrides are written key=value, e.g. optim.lr=0.003")
    return key.strip()


@contextlib.contextmanager
def _omegaconf_errors(where: str) -> Iterator[None]:
    """OmegaConf's errors as a :class:`ConfigError` naming the key (or ``where``)."""
    try:
        yield
    except OmegaConfBaseException as e:
        text = first_line(e)
        if "is not a subclass of" in text:  # a section given a plain value (run=3)
            text = "is a section: set its keys (e.g. run.steps=5), not a value"
        elif "could not be converted" in text or "Unsupported value type" in text:
            text += " (the README's config reference gives each key's type)"
        raise ConfigError(e.full_key or where, text) from None
    except (ValueError, TypeError, OverflowError, RecursionError, AttributeError) as e:
        if isinstance(e, ConfigError):
            raise
        # OmegaConf and YAML scalars meet in odd ways (a list merged into a mapping, a
        # dotted key that is a value); all are a config mistake, never a traceback.
        if "incompatible container" in str(e):
            raise ConfigError(where, "must be a mapping (name: value), not a list") from None
        raise ConfigError(where, f"{type(e).__name__}: {first_line(e)}") from None


# -- checks --------------------------------------------------------------------------


def check_ranges(cfg: TrainConfig, base_dir: Path = Path("."), world_size: int = 1) -> None:
    """Refuse values that type-check but cannot run (torchtitan's ``__post_init__`` checks):
    first the torch-free ones, then those that need torch (targets, signatures, CUDA)."""
    r, c, o = cfg.run, cfg.checkpoint, cfg.optim
    for key, value in [
        ("run.batch_size", r.batch_size),
        ("run.val_every", r.val_every),
        ("run.log_every", r.log_every),
        ("run.max_bad_steps", r.max_bad_steps),
        ("checkpoint.keep", c.keep),
        ("loss.num_particles", cfg.loss.num_particles),
        ("predict.num_samples", cfg.predict.num_samples),
        ("schedule.every", cfg.schedule.every),
        ("dist.timeout_s", cfg.dist.timeout_s),
    ]:
        require(value > 0, key, f"must be > 0, got {value}")
    require(r.steps >= 0, "run.steps", f"must be >= 0, got {r.steps}")
    require(r.epochs >= 0, "run.epochs", f"must be >= 0, got {r.epochs}")
    require(r.steps > 0 or r.epochs > 0, "run.steps", "set run.steps > 0 or run.epochs > 0")
    require(c.every >= 0, "checkpoint.every", f"must be >= 0 (0: only at the end), got {c.every}")
    require(0 <= r.seed < 2**63, "run.seed", f"must be in [0, 2**63), got {r.seed}")
    require(r.threads >= 0, "run.threads", f"must be >= 0 (0: torch's default), got {r.threads}")
    require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    require(o.lr < float("inf"), "optim.lr", f"must be finite, got {o.lr}")
    require(o.clip_norm is None or o.clip_norm > 0, "optim.clip_norm", "must be > 0 or null")
    require(
        o.local_updates in ("dense", "lazy"),
        "optim.local_updates",
        f"must be dense or lazy, got {o.local_updates!r}",
    )
    require(
        cfg.dist.local_params in ("sharded", "replicated"),
        "dist.local_params",
        f"must be sharded or replicated, got {cfg.dist.local_params!r}",
    )
    require(
        cfg.dist.timeout_s <= MAX_TIMEOUT_S,
        "dist.timeout_s",
        f"must be at most {MAX_TIMEOUT_S} (a week), got {cfg.dist.timeout_s}",
    )
    require(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} is not one of {', '.join(OPTIMIZERS)}")
    require(
        cfg.loss.name in LOSSES, "loss.name", f"{cfg.loss.name!r} is not one of {', '.join(LOSSES)}"
    )
    require(
        cfg.loss.max_plate_nesting is None or cfg.loss.max_plate_nesting >= 0,
        "loss.max_plate_nesting",
        f"must be >= 0 or null, got {cfg.loss.max_plate_nesting}",
    )
    require(
        cfg.schedule.name in SCHEDULES,
        "schedule.name",
        f"{cfg.schedule.name!r} is not one of {', '.join(SCHEDULES)}",
    )
    require(
        0.0 <= cfg.data.val_fraction < 1.0,
        "data.val_fraction",
        f"must be in [0, 1), got {cfg.data.val_fraction}",
    )
    for key, value, allowed in [
        ("data.loader", cfg.data.loader, ("memory", "dataloader")),
        ("run.progress", r.progress, ("auto", "bar", "log", "none")),
        ("run.device", r.device, ("auto", "cpu", "cuda")),
        ("run.compile", r.compile.lower(), ("false", "true", "auto")),
        ("dist.backend", cfg.dist.backend, ("auto", "gloo", "nccl")),
        ("dist.shared_memory", cfg.dist.shared_memory.lower(), ("auto", "true", "false")),
    ]:
        require(value in allowed, key, f"must be {', '.join(allowed)}; got {value!r}")
    require(
        0 < cfg.dist.bucket_cap_mb < float("inf"), "dist.bucket_cap_mb", "must be > 0 and finite"
    )
    require(bool(cfg.name.strip()), "name", "must not be empty; give the job a name")
    require(
        not (o.name == "ClippedAdam" and cfg.schedule.name != "none"),
        "schedule.name",
        "ClippedAdam decays its own rate (optim.options.lrd); use schedule.name: none",
    )
    if c.resume not in ("auto", "never"):
        require(
            Path(c.resume).is_file(),
            "checkpoint.resume",
            f"must be auto, never or an existing checkpoint file, got {c.resume!r}",
        )
    for prefix, options in o.per_param.items():
        lr = options.get("lr", o.lr)
        require(
            isinstance(lr, (int, float)) and not isinstance(lr, bool) and lr > 0,
            f"optim.per_param.{prefix}.lr",
            f"must be > 0, got {lr!r}",
        )
    check_dir(c.dir, "checkpoint.dir")
    check_dir(cfg.log.dir, "log.dir")
    num_rows = builtin_num_rows(cfg.data.name, cfg.data.options)
    if num_rows is not None:
        require(num_rows > 0, "data.options.num_points", f"must be > 0, got {num_rows}")
        _check_memory(cfg, num_rows)
        check_batch(cfg, num_rows, world_size)
    _check_targets(cfg, base_dir)
    _check_optim(cfg)
    _check_device(cfg)


def check_dir(directory: str, key: str) -> None:
    """``directory`` is, or can be created as, a directory this process may write in.

    Nothing is left behind: the probe file is made in the nearest existing ancestor and
    removed at once.
    """
    require(bool(directory.strip()), key, "must not be empty")
    path = Path(directory)
    require(
        not path.exists() or path.is_dir(),
        key,
        f"{directory!r} is a file, not a directory; name a directory",
    )
    existing = path
    while not existing.exists():
        existing = existing.parent
    require(
        existing.is_dir(),
        key,
        f"{str(existing)!r} is a file, so {directory!r} cannot be created; name a directory",
    )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            key,
            f"cannot write in {str(existing)!r} ({e.strerror or e}); name a directory you "
            "can write to",
        ) from None


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(cfg: TrainConfig, num_rows: int) -> None:
    need = builtin_bytes(cfg.data.name, cfg.data.options, num_rows)
    have = _available_memory()
    if have is not None and need > have:
        raise ConfigError(
            "data.options.num_points",
            f"{num_rows} rows of {cfg.data.name} need about {need / 2**30:.1f} GiB to load, "
            f"and {socket.gethostname()} has {have / 2**30:.1f} GiB available; lower it",
        )


def check_batch(cfg: TrainConfig, num_rows: int, world_size: int) -> None:
    """The batch must fit in each rank's share of the training rows."""
    train_rows = num_rows - round(num_rows * cfg.data.val_fraction)
    per_rank = train_rows // world_size
    require(
        cfg.run.batch_size <= per_rank,
        "run.batch_size",
        f"must be <= {per_rank}, the training rows per rank ({train_rows} rows of "
        f"{cfg.data.name} after data.val_fraction={cfg.data.val_fraction}, {world_size} rank(s)); "
        f"got {cfg.run.batch_size}",
    )


def _check_targets(cfg: TrainConfig, base_dir: Path) -> None:
    """Model, data and guide names resolve, and their options are arguments they take."""
    from distsvi.infer import autoguide  # the engine, only once the config parsed
    from distsvi.train.data import LOADERS
    from distsvi.train.models import BUILTIN

    assert set(BUILTIN) == set(BUILTIN_MODELS) and set(LOADERS) == set(BUILTIN_DATA)
    model = BUILTIN.get(cfg.model.name)
    if model is None:
        cfg.model.name, model = import_target(cfg.model.name, "model.name", base_dir)
    if isinstance(model, type):
        _check_options(model, cfg.model.options, "model.options")
        from distsvi.nn import PyroModule

        # A PyroModule without a model method is the model through its forward.
        fallback = "forward" if issubclass(model, PyroModule) else None
        method = getattr(model, "model", None) or (fallback and getattr(model, fallback))
        require(
            callable(method),
            "model.name",
            f"{cfg.model.name} has no model method; give it one, or make it a "
            "distsvi.nn.PyroModule whose forward is the model",
        )
        check_model_signature(method, "model.name", cfg.model.name, is_method=True)
    else:
        require(callable(model), "model.name", f"{cfg.model.name} is not callable")
        check_model_signature(model, "model.name", cfg.model.name)
    loader = LOADERS.get(cfg.data.name)
    if loader is None:
        cfg.data.name, loader = import_target(cfg.data.name, "data.name", base_dir)
        require(callable(loader), "data.name", f"{cfg.data.name} is not callable")
    _check_options(loader, cfg.data.options, "data.options")
    if cfg.guide.name in AUTOGUIDES:
        _check_options(getattr(autoguide, cfg.guide.name), cfg.guide.options, "guide.options")
    elif cfg.guide.name == "model":
        require(
            isinstance(model, type) and callable(getattr(model, "guide", None)),
            "guide.name",
            f"'model' needs a model class with a guide method; {cfg.model.name} has none "
            "(use an autoguide such as AutoNormal)",
        )
    else:
        cfg.guide.name, guide = import_target(cfg.guide.name, "guide.name", base_dir)
        require(callable(guide), "guide.name", f"{cfg.guide.name} is not callable")
        from distsvi.nn import PyroModule

        if isinstance(guide, type) and issubclass(guide, PyroModule):
            # A PyroModule guide class is built with guide.options; its forward is the guide.
            _check_options(guide, cfg.guide.options, "guide.options")
            check_model_signature(guide.forward, "guide.name", cfg.guide.name, is_method=True)
        else:
            check_model_signature(guide, "guide.name", cfg.guide.name)


def check_model_signature(
    fn: Any, key: str, name: str, num_tensors: int | None = None, is_method: bool = False
) -> None:
    """``fn`` can be called as the trainer calls a model or guide:
    ``fn(*tensors, size=N, subsample_size=B, subsample=idx)``."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # not introspectable: the call will tell
    positional = [None] * (num_tensors if num_tensors is not None else 0)
    if is_method:
        positional.insert(0, None)
    try:
        if num_tensors is None:
            signature.bind_partial(*positional, size=1, subsample_size=1, subsample=None)
        else:
            signature.bind(*positional, size=1, subsample_size=1, subsample=None)
    except TypeError as e:
        shown = f" with {num_tensors} data tensors" if num_tensors is not None else ""
        raise ConfigError(
            key,
            f"{name}{signature} cannot be called as the trainer calls it{shown}: {e}. Write "
            "it as def model(*tensors, size, subsample_size=None, subsample=None), one "
            "positional argument per data tensor, observations last",
        ) from None


def _check_options(fn: Any, options: dict[str, Any], key: str, skip: tuple = ()) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # not introspectable: the call will tell
    try:
        bound = signature.bind_partial(*[None] * len(skip), **options)
    except TypeError as e:
        name = getattr(fn, "__name__", str(fn))
        hidden = {"self", "model", "params", "optimizer", "lr" if "params" in skip else "", *skip}
        allowed = [
            p.name
            for p in signature.parameters.values()
            if p.name not in hidden and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        unknown = [k for k in options if k not in signature.parameters]
        if unknown:  # name the option itself, and the one it was probably meant to be
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"{key}.{unknown[0]}",
                f"{name} takes no option {unknown[0]!r}; {hint}its options: "
                f"{', '.join(allowed) or 'none'}",
            ) from None
        raise ConfigError(key, f"{e} (options of {name}: {', '.join(allowed) or 'none'})") from None
    for option, value in bound.arguments.items():
        if option in options:
            _check_option_type(signature.parameters[option], value, f"{key}.{option}")


def _check_option_type(param: inspect.Parameter, value: Any, key: str) -> None:
    """An option whose default (or annotation) is a plain number, flag or string takes a
    value of that kind: ``num_groups: abc`` is refused here, not deep inside a step."""
    annotation = (
        param.annotation
        if isinstance(param.annotation, str)
        else getattr(param.annotation, "__name__", "")
    )
    default = param.default
    if "float" in str(annotation) or isinstance(default, float) and not isinstance(default, bool):
        want, ok = "a number", isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, bool):
        want, ok = "true or false", isinstance(value, bool)
    elif isinstance(default, int):
        want, ok = "an integer", isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, str) and str(annotation) in ("", "str"):
        want, ok = "a string", isinstance(value, str)
    else:
        return
    require(ok, key, f"must be {want} (default {default!r}), got {value!r}")


def _check_optim(cfg: TrainConfig) -> None:
    """optim.options are the optimizer's arguments; schedule.options the scheduler's, with
    every argument it requires."""
    import torch

    from distsvi import optim as optim_lib

    o = cfg.optim
    constructor = getattr(optim_lib, o.name)({"lr": o.lr}).pt_optim_constructor
    require("lr" not in o.options, "optim.options.lr", "set the learning rate as optim.lr")
    _check_options(constructor, o.options, "optim.options", skip=("params",))
    for prefix, extra in o.per_param.items():
        _check_options(constructor, extra, f"optim.per_param.{prefix}", skip=("params",))
    if cfg.schedule.name == "none":
        require(
            not cfg.schedule.options,
            "schedule.options",
            "set schedule.name (exponential, step, cosine) to use these options, or drop them",
        )
        return
    cls = getattr(torch.optim.lr_scheduler, SCHEDULERS[cfg.schedule.name])
    _check_options(cls, cfg.schedule.options, "schedule.options", skip=("optimizer",))
    missing = [
        p.name
        for p in list(inspect.signature(cls).parameters.values())[1:]
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in cfg.schedule.options
    ]
    require(
        not missing,
        f"schedule.options.{missing[0] if missing else ''}",
        f"schedule {cfg.schedule.name} ({cls.__name__}) needs {', '.join(missing)}, e.g. "
        f"schedule.options.{missing[0] if missing else ''}=1000",
    )


def _check_device(cfg: TrainConfig) -> None:
    if cfg.run.device != "cuda" and cfg.dist.backend != "nccl":
        return
    import torch

    if torch.cuda.is_available():
        return
    key = "run.device" if cfg.run.device == "cuda" else "dist.backend"
    value = "cuda" if key == "run.device" else "nccl"
    fix = "run.device=auto (or cpu)" if key == "run.device" else "dist.backend=auto (or gloo)"
    raise ConfigError(key, f"{value} needs CUDA, which this machine lacks; use {fix}")
