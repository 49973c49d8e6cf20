"""Typed experiment configuration: the dataclasses every YAML file and ``key=value`` override is
checked against (OmegaConf struct mode refuses unknown keys and coerces types).

Defaults are the paper's settings (docs/method.md): Swin UNETR v1 (feature size 48, dropouts
0.1) on 96^3 patches, batch 2 per GPU on 2 GPUs (DDP), 16-bit mixed precision, Adam with weight
decay 1e-5, 10 warm-up epochs then cosine decay over 400, Dice + cross-entropy. Experiment
files compose what differs: ``hardware/``, ``backbones/`` and the arm's own file.

Values that must agree with the data (number of classes, input channels, label names) are not
configured here: they are derived in code from the dataset, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sap_lightning.core.protocol import (
    BOOTSTRAP_RESAMPLES,
    DEFAULT_CONNECTIVITY,
    DEFAULT_THRESHOLD,
    SURFACE_TOLERANCE_MM,
)
from sap_lightning.core.tasks import TASKS as _TASK_TABLE

TASKS = tuple(_TASK_TABLE)
LOGGERS = ("wandb", "csv", "none")


@dataclass
class AugmentConfig:
    """TorchIO training augmentations (docs/method.md: flips, 90-degree rotations, intensity scale and
    shift). Probabilities of 0 switch an augmentation off."""

    flip_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    flip_p: float = 0.5
    rot90_p: float = 0.5
    """Probability of a random multiple of 90 degrees in the axial (X-Y) plane."""
    intensity_scale: float = 0.1
    """Multiplicative factor drawn from [1 - s, 1 + s] per channel."""
    intensity_shift: float = 0.1
    """Additive offset drawn from [-s, s] per channel."""
    intensity_p: float = 0.5


@dataclass
class DataConfig:
    dataset: str = "data/phantoms/lesion"
    """nnU-Net v2 raw dataset folder (``dataset.json``, ``imagesTr``, ``labelsTr``)."""
    cache: str | None = None
    """Preprocessing cache folder; default ``$SAP_PREPROCESSED/<dataset name>/cache`` when that
    environment variable is set, else ``<dataset>/../cache/<dataset name>`` (or
    ``~/.cache/sap_lightning/<dataset name>/cache`` when that is not writable)."""
    splits: str | None = None
    """``splits.json`` (written by ``sap split``, or by training if absent); default
    ``$SAP_PREPROCESSED/<dataset name>/splits.json`` when that variable is set, else
    ``<dataset>/splits.json`` (or ``~/.cache/sap_lightning/<dataset name>/splits.json`` when the
    dataset folder is read-only)."""
    fold: int = 1
    """Lesion task: the test fold held out of training (never the tuning fold)."""
    n_folds: int = 7
    tuning_fold: int = 0
    split_seed: int = 0
    val_fraction: float = 0.125
    target_spacing: list[float] | None = None
    """Optional resampling (mm) applied by the preprocessing cache; None keeps the data's grid."""
    patch_size: list[int] = field(default_factory=lambda: [96, 96, 96])
    batch_size: int = 2
    """Per process (per GPU under DDP)."""
    num_workers: int = 4
    sampler: str = "auto"
    """A registered patch planner (``batches/planners.py``); ``auto`` takes the task's default
    from the task table: instance_balanced (lesion), class_balanced (skeleton), uniform (ssl)."""
    class_fraction: float = 1.0
    """Class-balanced skeleton sampler: the share of patches that contain a voxel of a
    foreground class drawn uniformly; the rest are centred uniformly in the body (nnU-Net
    oversamples foreground in a third of its patches)."""
    samples_per_volume: int = 4
    queue_length: int = 32
    patches_per_epoch: int | None = None
    """Patches per epoch over all ranks for the skeleton and SSL samplers; the lesion sampler
    draws two per lesion (one positive, one negative). None: ``samples_per_volume`` x cases."""
    positive_margin: int = 10
    """Voxels added around a lesion's bounding box before cropping a positive patch."""
    positive_min_scale: float = 4.0 / 3.0
    """The positive region is enlarged to at least this multiple of the patch size."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    backbone: str = "swin_unetr"
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for the backbone factory over its registered defaults (see
    ``sap_lightning.backbones``; swin_unetr's are the paper's)."""
    init: str = "scratch"
    """Lesion task: the arm that initialises the network, a registered arm (``core/arms.py``:
    ``scratch`` random, ``sap`` all but the head of a skeleton network, ``ssl`` / ``mae`` the
    encoder of a self-supervised one)."""
    pretrained: str | None = None
    """Checkpoint, exported backbone or run folder to initialise from (``init`` sap or ssl)."""
    pretrained_by_init: dict[str, str] = field(default_factory=dict)
    """Default ``pretrained`` per arm (e.g. ``{sap: runs/pretrain, ssl: runs/ssl}``), so
    one experiment file (or a sweep) can switch arms with ``model.init`` alone."""
    in_channel_policy: str = "by_name"
    """Fine-tuning from a source trained on other input channels: ``by_name`` (channels matched
    by name; a channel the source lacks, e.g. ADC after a T1 + b1000 pretraining, starts with a
    zero kernel, so the pretrained function is unchanged at step 0), ``repeat_mean`` (the mean
    kernel repeated, for unnamed channels) or ``error`` (refuse)."""
    channels_last: bool = False
    """Keep the network's convolution weights, and so its activations, in PyTorch's
    channels-last 3D layout (``torch.channels_last_3d``), which oneDNN and cuDNN convolve
    faster in many cases: ``python benchmarks/bench_step.py`` prints the ratio on a machine
    ("channels last step ratio"). The weights and results are the same up to float rounding;
    the checkpoint records it, so validation and ``sap predict`` run the same layout."""
    head_prior: float | None = None
    """Lesion task: start the output layer's bias at this lesion probability (Lin et al.'s prior
    initialisation for a rare foreground; ``None`` keeps the backbone's zero bias, p = 0.5).
    From p = 0.5 the cross-entropy over patches that are almost all background drives the
    lesion logits far down in the first steps, where the softmax leaves the Dice term little
    gradient (the loss plateau). The output layer is never transferred, so every arm starts
    from the same prior."""


@dataclass
class OptimConfig:
    optimizer: str = "adam"
    """A registered optimiser (``modules/optim.py``): adam, adamw, sgd."""
    lr: float = 1e-5
    """Learning rate of every parameter unless ``encoder_lr`` / ``decoder_lr`` are set."""
    encoder_lr: float | None = None
    decoder_lr: float | None = None
    encoder_lr_by_init: dict[str, float] = field(default_factory=dict)
    """Lesion task: the encoder's rate per arm when ``encoder_lr`` is not given (the decoder
    then trains at ``decoder_lr`` or ``lr``), so one file switching arms with ``model.init``
    (a sweep) gives each arm the study's rate ratio, as ``model.pretrained_by_init`` gives it
    its pretraining run."""
    weight_decay: float = 1e-5
    warmup_epochs: int = 10
    """Linear warm-up epochs, then cosine decay to ``min_lr_ratio`` x lr at ``max_epochs``
    (the paper's epoch-based schedule; used when ``trainer.max_steps`` is not set)."""
    warmup_steps: int = 0
    """With ``trainer.max_steps`` > 0: linear warm-up optimiser steps, then cosine decay to
    ``min_lr_ratio`` x lr at ``max_steps``; the schedule then steps every optimiser step."""
    min_lr_ratio: float = 0.0


@dataclass
class LossConfig:
    """Segmentation loss, chosen by name from ``sap_lightning.modules.losses`` (``list_losses()``).

    ``dice_ce`` is the paper's: softmax, Dice without the background class + cross-entropy.
    """

    name: str = "dice_ce"
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    smooth: float = 1e-5
    focal_gamma: float = 2.0
    """Exponent of the focal term of ``batch_dice_focal`` (Lin et al.'s 2)."""
    tversky_alpha: float = 0.2
    """Weight of the false positives in ``batch_tversky_ce``'s Tversky index (F2: 1/5)."""
    tversky_beta: float = 0.8
    """Weight of the false negatives in ``batch_tversky_ce``'s Tversky index (F2: 4/5)."""
    topk_percent: float = 10.0
    """``batch_dice_topk``: the share of the batch's voxels (the hardest) whose cross-entropy
    is averaged (nnU-Net's k = 10)."""


@dataclass
class SSLConfig:
    """Tang et al. (CVPR 2022) recipe: rotation + contrastive + inpainting reconstruction."""

    rotation_weight: float = 1.0
    contrastive_weight: float = 1.0
    reconstruction_weight: float = 1.0
    temperature: float = 0.5
    projection_dim: int = 512
    cutout_fraction: float = 0.3
    """Fraction of the patch volume masked out in each view before reconstruction."""
    head_input: str = "tokens"
    """What the rotation and contrastive heads read from the bottleneck: ``flatten`` (every
    bottleneck voxel, in order), ``tokens`` (Tang et al.: voxel 0 for rotation, voxel 1 for the
    contrastive projection) or ``pool`` (global mean, which collapses after instance norm)."""
    head_lr: float | None = None
    """Learning rate of the three heads (default ``optim.lr``). A linear head over a flattened
    bottleneck has thousands of inputs: an Adam step of ``lr`` on every weight moves its logits
    by about ``lr`` x the sum of the inputs, so the CPU files give it a tenth of ``optim.lr``."""
    rotation_plane: str = "sagittal"
    """Plane of the pretext's quarter turns: ``sagittal`` (about the left-right axis, Tang et
    al.'s ``rot90(k, (2, 3))`` of RAS patches), ``coronal`` or ``axial``. A quarter turn in a
    plane that holds the body's long axis is visible on every patch; in the axial plane a limb's
    near-round cross-section looks alike under every turn, and the rotation term stayed at
    chance on the synthetic cohort."""
    shared_view_rotation: bool = True
    """Give both views of a patch the same pretext rotation (Tang et al.: independent). Needed
    with ``flatten`` and ``tokens`` heads: position-keeping features of two differently rotated
    views are permuted copies of each other (a token reads different places), which a linear
    projection cannot match (the contrastive term stayed at chance for the tiny U-Net and for
    Swin UNETR); the rotation label is still drawn per patch. On in the CPU and paper files."""


@dataclass
class MAEConfig:
    """The ``mae`` arm's pretraining (Wald et al., CVPR 2025; nnssl's BaseMAETrainer):
    ``modules/mae.py``, run with ``task: ssl`` and ``pretraining: mae``."""

    mask_ratio: float = 0.75
    """Fraction of the coarse grid's blocks set to 0 in the input (nnssl: 0.75)."""
    block_size: int = 16
    """Edge of a masked block in voxels (nnssl: 16 on 160^3 patches); divides the patch size."""


@dataclass
class ValidationConfig:
    sw_batch_size: int = 4
    overlap: float = 0.25
    every_n_epochs: int = 10
    threshold: float = DEFAULT_THRESHOLD
    """Probability threshold for lesion metrics during validation (tuned later on the tuning fold)."""
    tolerance_mm: float = SURFACE_TOLERANCE_MM
    connectivity: int = DEFAULT_CONNECTIVITY
    roi_size: list[int] | None = None
    """Sliding-window size for whole-case inference (validation and ``sap predict``); None: the
    training patch size. Larger windows are faster for convolutional backbones."""
    body_only: bool = False
    """Whole-case inference (validation, threshold tuning, ``sap predict``) labels every voxel
    outside the body mask background (the cache's mask: ``cache.compute_body_mask``). Training
    patches are centred in the body, so a window of air, where instance normalisation blows
    noise up to unit variance, is one the network never saw; the paper does not mask."""
    precision: str | None = None
    """Precision of whole-case inference (validation, threshold tuning, ``sap predict``): one
    of ``core.precision.AUTOCAST_PRECISIONS`` (``32-true``, ``bf16-mixed``, ``16-mixed``); None
    follows ``trainer.precision`` (its autocast, or float32). Recorded in the checkpoint, so
    ``sap predict`` uses it unless told otherwise; a CPU without fast kernels for the type runs
    float32 (``core.mixed_precision.effective_precision``)."""


@dataclass
class TrainerConfig:
    """Passed to ``lightning.Trainer``; see its documentation for each key.

    The defaults are the paper's two GPUs with batch 2 each (a global batch of 4).
    ``experiments/hardware/gpu.yaml`` keeps that global batch on any number of GPUs instead:
    ``devices: auto`` with ``global_batch_size: 4`` (docs/cluster.md).
    """

    accelerator: str = "gpu"
    devices: Any = 2
    num_nodes: int = 1
    strategy: str = "ddp"
    precision: str = "16-mixed"
    """One of Lightning's precisions this library trains at: ``16-mixed``, ``bf16-mixed`` or
    ``32-true`` (Lightning's aliases ``16``, ``bf16`` and ``32`` are read as those)."""
    global_batch_size: int | None = None
    """Patches per optimiser step over all processes; when set, ``data.batch_size`` is derived
    at start as this / (processes x ``accumulate_grad_batches``) and recorded in the run's
    config, so the schedule and learning rates keep their meaning on any number of GPUs. A
    global batch that does not split evenly is refused. None: ``data.batch_size`` per process."""
    checkpoint_every_minutes: float | None = None
    """Write ``checkpoints/last.ckpt`` every this many minutes of training (inside an epoch if
    need be) and when training ends, instead of after every epoch: with Adam's state it is
    about 0.75 GB for Swin UNETR, flushed to disk each time. None: after every epoch."""
    max_epochs: int = 400
    max_steps: int = -1
    """Optimiser steps of the run; when > 0 it ends training and drives the schedule, so every
    arm and every fold gets the same budget whatever its epoch length (an instance-balanced
    epoch has one step per lesion). Training stops at whichever of ``max_steps`` and
    ``max_epochs`` comes first, so a pure step budget sets ``max_epochs`` high."""
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 2
    """Validation cases run before training to catch a broken validation early (Lightning's
    default); the CPU files skip it: their only validation comes minutes later, at the end."""
    log_every_n_steps: int = 10
    deterministic: bool = False
    fast_dev_run: Any = False
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    enable_progress_bar: bool = True


@dataclass
class WandbConfig:
    project: str = "sap_lightning"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    """``online``, ``offline`` or ``disabled``; unset: ``WANDB_MODE`` from the environment, else
    ``online`` under a sweep agent, else ``offline`` (sync later with ``wandb sync``)."""


@dataclass
class ExperimentConfig:
    task: str = "lesion"
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    run_dir: str | None = None
    """Folder of this run; default ``<output_dir>/<name>``."""
    resume: bool = False
    """Continue from ``<run_dir>/checkpoints/last.ckpt``."""
    pretraining: str | None = None
    """Pretraining tasks (skeleton, ssl): the arm whose pretraining this run is (``core/arms.py``;
    it picks the LightningModule); None: the task's built-in arm (skeleton: sap, ssl: ssl)."""
    logger: str = "wandb"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    pretext: dict[str, Any] = field(default_factory=dict)
    """Settings of a pretraining arm added by a user (``Pretraining.section = "pretext"``),
    read and checked by its own module (docs/extending.md)."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class StudyConfig:
    """The whole study in one run (``sap study``): cohort, pretraining, the arms, report.

    Every arm's runs read the packaged experiment files of ``profile`` (its pretraining file
    and ``finetune_<arm>.yaml``), then ``bases`` over them, then ``overrides`` (every run),
    then the arm's own ``pretraining_overrides`` / ``finetune_overrides``; so any experiment
    key can be changed for the whole study or for one arm.
    """

    name: str = "demo"
    seed: int = 0
    data_dir: str = "data/demo"
    """Where the synthetic cohort, its cache and splits are written."""
    dataset_root: str | None = None
    """Use an existing cohort (folder with ``skeleton/`` and ``lesion/`` datasets) instead."""
    healthy: int = 10
    patients: int = 14
    mimics: float = 1.0
    """The synthetic cohort's difficulty knob: every mimic's prevalence times this (0 none, 1 the
    table of docs/cohort.md, 2 twice)."""
    phantom_shape: list[int] | None = None
    phantom_spacing: list[float] | None = None
    n_folds: int = 3
    tuning_fold: int = 0
    skeleton_val_fraction: float = 0.2
    """Healthy scans held out to validate the skeleton network, by subject (0.2 of the demo's
    10 scans of 6 volunteers holds out two scans)."""
    runs_dir: str = "runs/demo"
    report_dir: str = "reports/demo"
    arms: list[str] = field(default_factory=lambda: ["scratch", "ssl", "sap"])
    """Registered arms (``core/arms.py``) in report order; each pretraining they need runs once."""
    profile: str = "experiments/cpu"
    """Folder of experiment files: each arm's ``<pretraining.experiment>.yaml`` and
    ``finetune_<arm>.yaml`` (a path, or ``experiments/<name>`` for the packaged ones)."""
    bases: list[str] = field(default_factory=list)
    """Experiment files merged over every run's own, e.g. ``experiments/backbones/resenc_cpu.yaml``
    puts every arm on another backbone."""
    overrides: list[str] = field(default_factory=list)
    pretraining_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Arm -> overrides of that arm's pretraining run."""
    finetune_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Arm -> overrides of that arm's fine-tuning runs."""
    predict_overlap: float = 0.25
    n_resamples: int = BOOTSTRAP_RESAMPLES
    stage: str = "report"
    """``report``: the whole study. ``training``: the pretraining and fine-tuning runs and their
    "Did the networks learn?" section only (``<report_dir>/learning.md``), no test fold
    predicted: a recipe is checked on the tuning fold before any test result exists
    (docs/protocol.md). A later ``report`` run reuses the trained runs."""
    repeats: int = 1
    """Independent repeats (docs/protocol.md): repeat ``r`` draws cohort, splits and networks
    with seed ``seed + r``; repeat 0 is the study's own folders, repeat ``r`` their
    ``_repeat<r>`` siblings, and the pooled report goes to ``<report_dir>_repeats``."""
    workers: int = 1
    """Study steps run at once, each in its own process with ``usable CPUs // workers`` torch
    threads (``SAP_NUM_THREADS`` pins it). Runs that do not depend on each other (the
    pretraining runs, the arms and folds) then overlap. 1 runs every step in this process, one
    after the other. Results depend on the threads per run, not on ``workers``."""
