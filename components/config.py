"""params.yaml, read into one typed model per stage.

params.yaml stays the single source of truth (DVC tracks it); these models only
check it, so a typo fails at once with the key, the value and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import TumorScopeError

PARAMS_FILE = Path("params.yaml")
NO_TUMOUR = "notumor"
TUMOUR = "tumor"  # the one tumour class of a tumour-or-not set (LGG)
TUMOUR_TYPES = ("glioma", "meningioma", "pituitary")  # the types that class-folder sets (Masoud) name
# Ingest's default bar for a mirrored copy (components/dedup.py), above its bar for images as they are: a brain is
# nearly symmetric, so one patient's neighbouring slices, or the featureless top slices of two patients, also look
# alike mirrored, and at 0.97 such pairs chained LGG's 40 patients into 22 groups, one of 755 slices. Masoud's mirrored
# copies correlate ≥ 0.995 (3,006 pairs); LGG has no pair at 0.99.
MIRRORED_COPY = 0.99
# Ingest's default bar for one image saved twice (as it is or mirrored), where differing labels mean one is wrong.
# Masoud's three such pairs (meningioma and pituitary) correlate >= 0.99994; the closest pair of different labels
# otherwise is LGG's neighbouring slices at a tumour's end, 0.9989; the synthetic cohort's, 0.988.
EXACT_COPY = 0.9997
UNREADABLE, LABEL_CONFLICT = "unreadable", "label_conflict"  # the kinds of quarantine.csv: validation gates each share
QUARANTINE_COLUMNS = ["image_id", "file", "kind", "problem"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SynthConfig(Section):
    out: Path = Path("data/synth")
    subjects: int = Field(400, ge=4)
    slices_per_subject: int = Field(2, ge=1, le=8)
    image_size: int = Field(128, ge=32, le=512)
    prevalence: float = Field(0.5, gt=0, lt=1)
    shift: Literal["none", "scanner", "prevalence", "lesion_size"] = "none"
    volumes: bool = False
    volume_size: int = Field(96, ge=32, le=256)
    seed: int = 42


class VolumeConfig(Section):
    """How NIfTI and DICOM volumes become preprocessed volumes and labelled slices (components/volumes.py)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop_margin: int = Field(4, ge=0)
    register_to_template: bool = False
    slice_sequences: list[Literal["t1", "t1c", "t2", "flair", "image"]] = ["t1", "flair", "t1c"]
    min_lesion_mm2: float = Field(10.0, ge=0)
    min_brain_fraction: float = Field(0.2, ge=0, le=1)
    slices_take_volume_label: bool = False  # without a segmentation, every brain slice takes its volume's label

    @model_validator(mode="after")
    def _positive_spacing(self) -> VolumeConfig:
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive millimetres, got {self.spacing}")
        return self


class IngestConfig(Section):
    source: Path = Path("data/synth")
    format: Literal["auto", "folders", "lgg", "nifti", "dicom"] = "auto"
    out: Path = Path("data/manifest.csv")
    derived_dir: Path = Path("data/derived")  # slices and volumes made from NIfTI/DICOM sources
    feedback_dir: Path | None = None  # clinician-labelled served slices (the feedback stage's output); training only
    volume: VolumeConfig = VolumeConfig()
    duplicate_correlation: float = Field(0.97, gt=0, le=1)
    mirror_correlation: float | None = Field(MIRRORED_COPY, gt=0, le=1)  # a left-right mirrored copy joins at this; None: not sought
    label_conflict_correlation: float | None = Field(EXACT_COPY, gt=0, le=1)  # copies this close with differing labels: quarantined
    cache_dir: Path | None = None  # default: a cache/ folder beside the manifest

    @property
    def cache_root(self) -> Path:
        return self.cache_dir or self.out.parent / "cache"


class FeedbackConfig(Section):
    min_labels: int = Field(0, ge=0)  # fewer labelled predictions than this: export none yet


class ValidateConfig(Section):
    manifest: Path = Path("data/manifest.csv")
    report_dir: Path = Path("reports/validation")
    min_images: int = Field(20, ge=1)
    min_class_fraction: float = Field(0.05, ge=0, lt=1)
    min_image_side: int = Field(32, ge=1)
    min_image_std: float = Field(0.001, ge=0, le=1)
    max_unreadable_fraction: float = Field(0.0, ge=0, le=1)
    max_label_conflict_fraction: float = Field(0.01, ge=0, le=1)  # images quarantined for an exact copy with another label
    max_spacing_spread_mm: float = Field(0.01, ge=0)  # volume slices: standard deviation of voxel spacing
    required_sequences: list[Literal["t1", "t1c", "t2", "flair"]] = []  # volume slices: sequences every case needs


class SplitConfig(Section):
    manifest: Path = Path("data/manifest.csv")
    out: Path = Path("data/split.csv")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0, lt=0.5)
    folds: int = Field(5, ge=0, le=20)
    seed: int = 42


class FeaturesConfig(Section):
    split: Path = Path("data/split.csv")
    out: Path = Path("data/features.csv")
    report_dir: Path = Path("reports/features")
    image_size: int = Field(128, ge=32, le=512)
    levels: int = Field(32, ge=8, le=256)
    top_k: int = Field(20, ge=1)
    seed: int = 42


class ClassicalConfig(Section):
    features: Path = Path("data/features.csv")
    selected: Path = Path("reports/features/selected.json")
    split: Path = Path("data/split.csv")
    report_dir: Path = Path("reports/classical")
    models: list[Literal["logistic_regression", "svm", "random_forest", "gradient_boosting"]] = [
        "logistic_regression",
        "svm",
        "random_forest",
        "gradient_boosting",
    ]
    bootstrap_resamples: int = Field(500, ge=0)
    seed: int = 42
    experiment: str = "tumorscope-classical"


class PretrainConfig(Section):
    """Another labelled set of brain MRI that the train stage's network learns first: its images less their copies
    of the pipeline's own (components/pretrain_set.py), then the training (components/pretrain.py)."""

    source: Path | None = None  # other patients' slices in a layout ingest reads (class folders, LGG, …); None: no pretraining
    target: Path = Path("data/manifest.csv")  # the pipeline's own images: a pretraining copy of any of them is left out
    data_dir: Path = Path("data/pretrain")  # the pretraining set's manifest and split
    out_dir: Path = Path("models_pretrained")  # its weights, where the train stage starts from
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    copy_correlation: float = Field(0.97, gt=0, le=1)  # thumbnails correlating this much are one image (ingest's near-duplicates)
    epochs: int = Field(24, ge=1)
    max_minutes: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    augment: bool = True
    seed: int = 42

    @property
    def split_file(self) -> Path:
        """The pretrain_set stage's split: what the pretrain stage trains on and train's co-training draws from."""
        return self.data_dir / "split.csv"


class TrainConfig(Section):
    split: Path = Path("data/split.csv")
    out_dir: Path = Path("models")
    network: Literal["resnet", "densenet121"] = "resnet"
    image_size: int = Field(96, ge=32, le=512)
    early_image_size: int | None = Field(None, ge=32, le=512)  # progressive resizing: training batches at this size
    early_share: float = Field(0.5, gt=0, lt=1)  # ...for this share of training (steps or the time budget), then image_size
    in_channels: Literal[1, 3] = 1  # 3: colour slices as three sequences (LGG's T1, FLAIR, T1c); gray inputs are repeated
    channels: list[int] = [16, 32, 64, 128]
    blocks: list[int] = [1, 1, 1, 1]
    norm: Literal["batch", "group", "instance"] = "group"
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.05, ge=0, lt=1)
    patience: int = Field(4, ge=1)
    augment: bool = True
    mixup: float = Field(0.0, ge=0)  # Beta(α, α) of mixup; 0: off. Regularises a network that memorises its train set
    sequence_dropout: float = Field(0.0, ge=0, le=1)  # chance a multi-sequence training slice gets copies for some sequences
    intensity_jitter: float = Field(0.0, ge=0, le=1)  # chance a training slice gets per-sequence gamma and a bias field
    ema_decay: float = Field(0.0, ge=0, lt=1)  # > 0: the model is the exponential moving average of its weights (per step)
    mask_weight: float = Field(0.0, ge=0)  # > 0: a ResNet that also maps the lesion, its loss weighted so (needs masks)
    members: int = Field(1, ge=1)  # > 1: an ensemble of networks from seeds seed, seed + 1, …, sharing max_minutes
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    max_minutes: float | None = Field(None, gt=0)  # a hard limit on training time; the learning rate anneals within it
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    lr_scaling: Literal["none", "linear"] = "none"
    resume: bool = True  # a killed run with the same params and data resumes from its last checkpoint
    checkpoint_root: Path = Path("data/checkpoints")
    init_weights: Path | None = None  # local pretrained weights (state dict or Lightning checkpoint); none are downloaded
    pretrained_lr_factor: float = Field(1.0, gt=0, le=1)  # < 1: tensors loaded from starting weights learn at this fraction of the rate
    cotrain_share: float = Field(0.0, ge=0, le=4)  # > 0: each epoch also draws this many pretraining images per train image
    cotrain_split: Path | None = (
        None  # where they are drawn from: Params.train_as_run sets the pretrain_set stage's (not settable in params.yaml)
    )
    threads: int = Field(2, ge=1)
    seed: int = 42
    experiment: str = "tumorscope"

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def effective_learning_rate(self) -> float:
        """Under DDP each step averages world_size × batch_size images; 'linear' scales the rate with that."""
        return self.learning_rate * (self.world_size if self.lr_scaling == "linear" else 1)

    @model_validator(mode="after")
    def _stages_match(self) -> TrainConfig:
        if len(self.channels) != 4 or len(self.blocks) != 4:
            raise ValueError(f"channels and blocks need one entry per ResNet stage (4), got {len(self.channels)} and {len(self.blocks)}")
        if self.early_image_size is not None and self.early_image_size >= self.image_size:
            raise ValueError(f"early_image_size ({self.early_image_size}) must be below image_size ({self.image_size})")
        if self.mask_weight > 0 and self.network != "resnet":
            raise ValueError(f"mask_weight (a lesion map head) needs network 'resnet', not '{self.network}'")
        return self

    @property
    def uses_masks(self) -> bool:
        return self.mask_weight > 0


class CalibrateConfig(Section):
    """How the trained networks answer, fitted on validation (components/calibrate.py): changing it re-thresholds
    the networks the train stage left, without training them again."""

    model_dir: Path = Path("models")  # the train stage's networks
    split: Path = Path("data/split.csv")
    out_dir: Path = Path("models_calibrated")  # not under models/: DVC outputs cannot nest
    target_sensitivity: float | None = Field(None, gt=0, lt=1)  # None: operating threshold 0.5 on P(tumour)
    specificity_floor: float | None = Field(None, gt=0, lt=1)  # lowest validation specificity the threshold may cost (None: no floor)
    flip_averaging: bool = False  # predictions average the slice and its left-right mirror (test-time augmentation)
    lesion_vote: bool = False  # needs train.mask_weight > 0: P(tumour) averages the classifier's and the lesion map's
    threads: int = Field(2, ge=1)


class VolumeTrainConfig(Section):
    """A 3D MONAI CNN on the preprocessed volumes that ingest lists (components/volume_train.py)."""

    volumes: Path = Path("data/derived/volumes.csv")
    out_dir: Path = Path("models_volumes")  # not under models/: DVC refuses outputs inside the train stage's
    report_dir: Path = Path("reports/volumes")
    cache_dir: Path | None = Path("data/cache")  # resized volumes, keyed on the files; None: no disk cache
    network: Literal["resnet", "densenet121"] = "resnet"
    spatial_size: int = Field(64, ge=16, le=256)  # volumes are resized (aspect kept, zero-padded) to this cube
    channels: list[int] = [8, 16, 32, 64]
    blocks: list[int] = [1, 1, 1, 1]
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    min_volumes: int = Field(10, ge=2)  # fewer labelled volumes: the stage reports 'skipped' instead of training
    test_fraction: float = Field(0.25, gt=0, lt=0.5)
    seed: int = 42
    threads: int = Field(2, ge=1)
    experiment: str = "tumorscope-volumes"

    @model_validator(mode="after")
    def _network_fits(self) -> VolumeTrainConfig:
        if len(self.channels) != 4 or len(self.blocks) != 4:
            raise ValueError(f"channels and blocks need one entry per ResNet stage (4), got {len(self.channels)} and {len(self.blocks)}")
        if self.network == "densenet121" and self.spatial_size < 32:
            raise ValueError(f"densenet121 halves its input five times: spatial_size must be at least 32, got {self.spatial_size}")
        return self


class TuneConfig(Section):
    trials: int = Field(8, ge=1)
    folds: int = Field(3, ge=2)  # of the split's cross-validation folds
    epochs: int = Field(6, ge=1)  # per fold and trial
    storage: Path = Path("data/optuna.db")
    study: str = "tumorscope-train"
    experiment: str = "tumorscope-tune"
    seed: int = 42
    space: dict[str, dict] = {
        "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
        "label_smoothing": {"low": 0.0, "high": 0.15},
        "batch_size": {"choices": [16, 32, 64]},
    }


class EvaluateConfig(Section):
    split: Path = Path("data/split.csv")
    model_dir: Path = Path("models_calibrated")  # the calibrate stage's output
    report_dir: Path = Path("reports")
    min_group_size: int = Field(20, ge=1)
    bootstrap_resamples: int = Field(1000, ge=0)  # 0: no intervals
    lesion_curve_slices: int = Field(100, ge=0)  # tumour-free test slices that receive synthetic lesions (0: no curve)
    explain_tumours: int = Field(20, ge=0)  # test tumours with masks whose heatmaps are scored (0: none)


class RegisterConfig(Section):
    model_name: str = Field("tumorscope-synth", pattern=r"^[A-Za-z0-9_.-]+$")
    min_accuracy: float = Field(0.8, ge=0, le=1)
    min_sensitivity: float = Field(0.8, ge=0, le=1)
    min_specificity: float = Field(0.8, ge=0, le=1)
    min_auc: float = Field(0.85, ge=0, le=1)
    min_subgroup_sensitivity: float = Field(0.8, ge=0, le=1)
    max_smallest_lesion_mm: float | None = Field(None, gt=0)  # early detection: see components/lesion_curve.py
    tolerance: float = Field(0.005, ge=0, le=1)


class PackageConfig(Section):
    bento_model: str = Field("tumorscope-classifier", pattern=r"^[a-z0-9_.-]+$")


class MonitorConfig(Section):
    reference: Path = Path("data/reference.csv")
    report_dir: Path = Path("reports/monitoring")
    window: int = Field(1000, ge=1)
    min_samples: int = Field(30, ge=1)
    drift_share: float = Field(0.5, gt=0, le=1)
    min_feedback: int = Field(20, ge=1)
    max_accuracy_drop: float = Field(0.1, ge=0, le=1)
    cooldown_hours: float = Field(6.0, ge=0)
    embedding_drift_share: float = Field(0.6, gt=0, le=1)
    max_subgroup_gap: float = Field(0.25, ge=0, le=1)
    min_subgroup_feedback: int = Field(10, ge=1)


class Params(Section):
    synth: SynthConfig = SynthConfig()
    feedback: FeedbackConfig = FeedbackConfig()
    ingest: IngestConfig = IngestConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    split: SplitConfig = SplitConfig()
    features: FeaturesConfig = FeaturesConfig()
    classical: ClassicalConfig = ClassicalConfig()
    pretrain: PretrainConfig = PretrainConfig()
    train: TrainConfig = TrainConfig()
    calibrate: CalibrateConfig = CalibrateConfig()
    train_volumes: VolumeTrainConfig = VolumeTrainConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    register_: RegisterConfig = Field(RegisterConfig(), alias="register")
    package: PackageConfig = PackageConfig()
    monitor: MonitorConfig = MonitorConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> Params:
        # a params file from before the calibrate stage points evaluate at train's networks: uncalibrated, unregistrable
        if self.evaluate.model_dir == self.train.out_dir:
            raise ValueError(
                f"evaluate.model_dir is train.out_dir ({self.train.out_dir}), the uncalibrated networks: set it to "
                f"calibrate.out_dir ({self.calibrate.out_dir})"
            )
        if self.calibrate.lesion_vote and self.train.mask_weight == 0:
            raise ValueError(
                "calibrate.lesion_vote averages in the lesion map's opinion: it needs train.mask_weight > 0 (a lesion map head)"
            )
        if self.pretrain.source is not None and self.train.init_weights is not None:
            raise ValueError(
                f"pretrain.source and train.init_weights both name where training starts: set one "
                f"(pretrain.source pretrains on {self.pretrain.source}; train.init_weights loads {self.train.init_weights})"
            )
        if self.train.cotrain_split is not None:  # a split by hand would skip pretrain_set's copy check and DVC's tracking
            raise ValueError(
                "train.cotrain_split is the pretrain_set stage's split, set when the stage runs: set pretrain.source instead "
                "(its images are checked for copies of the pipeline's own)"
            )
        return self

    @property
    def train_as_run(self) -> TrainConfig:
        """The train section as its stage runs it: from the pretrain stage's weights when that stage pretrains, and
        co-training (``train.cotrain_share``) on its split."""
        if self.pretrain.source is None:
            return self.train
        return self.train.model_copy(update={"init_weights": self.pretrain.out_dir / "model.pt", "cotrain_split": self.pretrain.split_file})


# Keys that moved to another section: a params file or preset written before the move says where they went.
MOVED_KEYS = {
    "train.target_sensitivity": "calibrate.target_sensitivity",
    "train.specificity_floor": "calibrate.specificity_floor",
    "train.flip_averaging": "calibrate.flip_averaging",
    "train.lesion_vote": "calibrate.lesion_vote",
}


def _describe(error: ValidationError, path: Path) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"])
        value = problem.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        moved = f" (it moved to {MOVED_KEYS[key]})" if key in MOVED_KEYS else ""
        where = f"{key}{shown}: " if key else ""  # a check across sections has no single key
        lines.append(f"{path}: {where}{problem['msg']}{moved}")
    return "\n".join(lines)


PRESET_DIR = Path(__file__).resolve().parents[1] / "params"


def preset_overrides(preset: str) -> tuple[Path, dict]:
    """A data set's tuned settings: ``params/<name>.yaml`` or a YAML file, as {section: {key: value}}."""
    import yaml

    path = Path(preset) if preset.endswith((".yaml", ".yml")) else PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise TumorScopeError(f"{preset}: no such preset (presets: {known}; or a .yaml file)")
    try:
        overrides = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TumorScopeError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise TumorScopeError(f"{path}: expected params.yaml sections, each a mapping of keys to values")
    return path, overrides


def merge_into(target: dict, overrides: dict) -> None:
    """``overrides`` written over ``target`` key by key, nested mappings merged rather than replaced (a preset that
    sets ``ingest.volume.spacing`` keeps the rest of ``ingest.volume``). In place, so a comment-keeping YAML map stays one."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = value


def params_with_preset(preset: str | None, path: Path = PARAMS_FILE) -> Params:
    """params.yaml with a preset's values over it, section by section (benchmarks use a preset's network and
    operating point without touching params.yaml)."""
    params = load_params(path)
    if preset is None:
        return params
    preset_path, overrides = preset_overrides(preset)
    merged = params.model_dump(by_alias=True)
    merge_into(merged, overrides)
    try:
        return Params.model_validate(merged)
    except ValidationError as exc:
        raise TumorScopeError(_describe(exc, preset_path)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and check params.yaml; a missing file or a bad value is a TumorScopeError."""
    if not path.exists():
        raise TumorScopeError(f"{path}: not found (run from the workspace that holds dvc.yaml and params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TumorScopeError(f"{path}: not valid YAML: {exc}") from None
    return checked_params(raw, path)


def checked_params(raw: dict, path: Path = PARAMS_FILE) -> Params:
    """``raw`` (params.yaml's content, read or about to be written) as Params; a bad value is a TumorScopeError."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise TumorScopeError(_describe(exc, path)) from None
