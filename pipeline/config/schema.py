"""The one configuration schema: every setting the pipeline reads, with its default and its limits.

Configs are data (big_vision style): a preset YAML plus `key.sub=value` overrides resolve to one `Config`, which is
validated before any cluster resource is requested and saved beside every checkpoint. Nothing else in the code
holds a default for something that is configurable here.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator

from pipeline.config.batching import BatchSplit, check_batch_splits, split_batch
from pipeline.config.dataset_sections import IndexConfig, ShardsConfig
from pipeline.config.section import Section
from pipeline.storage.settings import StorageConfig


class ModelConfig(Section):
    """Xception and its head (the paper, section 4)."""

    name: Literal["xception"] = "xception"
    num_classes: PositiveInt = 17000
    fc_layers: list[PositiveInt] = Field(default_factory=list, description="widths of FC layers before the logits")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="before the logistic layer (and after each FC layer)")
    head_bias: float | Literal["auto"] = Field(
        "auto", description="initial logit bias; auto = -log(num_classes) for the multi-label losses (sigmoid, "
        "asymmetric), 0 for softmax")
    width_multiplier: PositiveFloat = Field(1.0, description="scales every channel count; < 1 only for fast tests")
    middle_blocks: PositiveInt = Field(8, description="middle-flow depth; the paper's model has 8")
    checkpoint_middle_flow: bool = Field(False, description="activation checkpointing of the middle flow")
    init_from: str | None = Field(
        None, description="start a new run from these weights (never on resume): a run or checkpoint directory of "
        "this project, Keras' Xception .h5 weights, or a timm legacy_xception state dict (.pth, .safetensors); "
        "prefixes run:, keras:, timm: override the detection by name. The backbone must match; the head is taken "
        "only when it matches too (same classes), else it starts fresh. Summary: <run>/init_from.json")
    init_weights: Literal["ema", "raw"] = Field("ema", description="with init_from a run: its EMA or raw weights")


class AugmentConfig(Section):
    """Inception-style training augmentation; evaluation uses a center crop."""

    random_resized_crop: bool = True
    min_area: float = Field(0.08, gt=0.0, le=1.0, description="smallest crop as a fraction of the image area")
    max_area: float = Field(1.0, gt=0.0, le=1.0)
    min_aspect: PositiveFloat = 3 / 4
    max_aspect: PositiveFloat = 4 / 3
    horizontal_flip: bool = True
    eval_crop_fraction: float = Field(0.875, gt=0.0, le=1.0, description="center crop before resizing for eval")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area={self.min_area} must be <= max_area={self.max_area}")
        if self.min_aspect > self.max_aspect:
            raise ValueError(f"min_aspect={self.min_aspect} must be <= max_aspect={self.max_aspect}")
        return self


class DemoConfig(Section):
    """The built-in demo dataset, generated on first use when `data.train` is not set (pipeline.data.demo)."""

    variant: Literal["openmoji", "tiny", "jft_like"] = Field(
        "openmoji", description="openmoji: real emoji art on photo textures (needs the 'demo' extra); tiny: shapes; "
        "jft_like: shapes made hard as JFT is (colour-shape classes with Zipf frequencies, 20% of true training "
        "labels dropped, 10% of training images with a false label; pipeline.data.demo.shapes)"
    )
    train_images: PositiveInt = 3000
    eval_images: PositiveInt = 500
    image_size: int = Field(160, ge=71, description="side of the generated images (crops are data.image_size)")
    seed: int = 0
    catalog_size: PositiveInt | None = Field(
        None, description="openmoji: only the N most common emoji (no skin-tone variants); None = all ~3,900")
    min_tag_count: PositiveInt = Field(
        5, description="openmoji: a tag (with catalog_size also a group or subgroup) is a class when at least this "
        "many of the emoji share it")
    eval_artist: Literal["same", "second"] = Field(
        "same", description="which evaluation set data.eval points at: objects drawn by the training images' artist "
        "(in-domain) or by a second artist (Twemoji; outlined shapes): both are generated")
    images_per_shard: PositiveInt = 250
    location: str = Field("~/.cache/xception-pipeline/demo", description="where the shards are written (any URL)")


class DataConfig(Section):
    """Where shards live and how they are streamed (dataset prefixes hold a manifest.json)."""

    train: str | None = Field(None, description="URL of the training dataset prefix (holds manifest.json)")
    eval: str | None = Field(None, description="URL of the densely labelled evaluation dataset prefix")
    image_size: int = Field(299, ge=71, description="square input side; 71 is Xception's smallest")
    loader_workers: int = Field(2, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held for in-stream shuffling; 0 disables")
    shuffle_shards: bool = True
    seed: int = 0
    decoder: Literal["pil_draft", "simplejpeg"] = Field(
        "simplejpeg",
        description="JPEG decoder, both scaling by 1/2, 1/4 or 1/8 while decoding: simplejpeg (faster at every "
        "size in tests/benchmarks/input_pipeline.py) or Pillow's draft mode",
    )
    fast_train_decode: bool = Field(
        True, description="simplejpeg's fast IDCT and chroma upsampling for training images (~10% faster); "
        "evaluation always decodes accurately",
    )
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description="fail the run above this corrupt fraction "
                                    "(of the samples a rank has read, judged over data.bad_data_window)")
    bad_data_window: int = Field(
        10_000, ge=1, description="judge max_bad_fraction once a rank has read this many samples (and at each epoch "
        "end), over everything it has read. Bad samples cluster by shard (a corrupt or truncated tar), so the window "
        "must span several shards to be fair: 10,000 samples are 2-3 shards of the default 256 MiB (~65 KB images) "
        "per loader worker of a rank with 2 workers; a first shard 14% bad in a dataset 5% bad no longer stops "
        "the run, as it did when 1,000 samples were judged. Data that is clearly hopeless stops earlier: as soon as "
        "more than max_bad_fraction x bad_data_window samples are bad, no full window could pass")
    cache_dir: str | None = Field(None, description="local shard cache directory (LRU); None disables")
    cache_max_gb: PositiveFloat = 50.0
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    demo: DemoConfig | None = Field(None, description="generate the demo dataset when data.train is not set")


class OptimizerConfig(Section):
    """RMSprop as TensorFlow defines it (the paper's JFT runs) or SGD with momentum (its ImageNet runs)."""

    name: Literal["rmsprop_tf", "sgd"] = "rmsprop_tf"
    lr: PositiveFloat = Field(0.001, description="learning rate at reference_batch_size")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    rmsprop_decay: float = Field(0.9, gt=0.0, lt=1.0, description="TF RMSprop 'decay' (rho) of the mean square")
    epsilon: PositiveFloat = Field(1.0, description="TF RMSprop epsilon, added inside the square root")
    weight_decay: float = Field(1e-5, ge=0.0, description="L2 coefficient added to the gradient (paper's L2)")
    grad_clip_norm: PositiveFloat | None = Field(None, description="global grad-norm clip; None disables")
    reference_batch_size: PositiveInt = Field(256, description="global batch at which lr applies as given")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="how lr scales with global_batch_size / reference_batch_size"
    )
    backbone_lr_multiplier: float = Field(
        1.0, ge=0.0, description="fine-tuning: the backbone's lr as a fraction of the head's (FC layers and "
        "classifier); the schedule scales both")


class ScheduleConfig(Section):
    """step: lr * decay_rate ** floor(progress / decay_every), progress in samples or epochs (the paper's);
    cosine: lr down to lr * final_fraction over train.total_steps (short and medium runs); constant."""

    name: Literal["step", "cosine", "constant"] = "step"
    decay_rate: float = Field(0.9, gt=0.0, le=1.0, description="step: factor per decay_every")
    decay_every: PositiveInt = Field(3_000_000, description="step: samples or epochs (unit) between decays")
    unit: Literal["samples", "epochs"] = Field("samples", description="step: what decay_every counts")
    final_fraction: float = Field(0.0, ge=0.0, le=1.0, description="cosine: the last step's lr as a fraction of lr")
    warmup_samples: int = Field(0, ge=0, description="linear warm-up from 0 over this many samples")


class LossConfig(Section):
    """Per-class sigmoid (the paper's, multi-label), asymmetric (ASL, multi-label with missing labels) or softmax
    (one label, ImageNet); for the two multi-label losses, optional down-weighting of negatives and of common
    classes (`pipeline.train.loss`; measured in tests/benchmarks/learning.py)."""

    name: Literal["sigmoid", "asymmetric", "softmax"] = "sigmoid"
    reduction: Literal["sum_classes_mean_batch", "mean"] = Field(
        "sum_classes_mean_batch",
        description="sigmoid and asymmetric: sum over classes then mean over images (default; gradients do not "
        "shrink with the class count), or mean over all image x class terms",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    gamma_neg: float = Field(4.0, ge=0.0, description="asymmetric: focusing exponent of the negative terms "
                             "(Ridnik et al., ICCV 2021: 4)")
    gamma_pos: float = Field(0.0, ge=0.0, description="asymmetric: focusing exponent of the positive terms "
                             "(Ridnik et al.: 0)")
    clip: float = Field(0.05, ge=0.0, lt=1.0, description="asymmetric: probability margin m; a negative's probability "
                        "p counts as max(p - m, 0), so negatives the model already scores below m add nothing "
                        "(Ridnik et al.: 0.05)")
    negative_weight: float = Field(
        1.0, gt=0.0, le=1.0, description="sigmoid and asymmetric: weight of every negative term, i.e. of every class "
        "not labelled on the image, which in sparsely labelled data (JFT's) may be a missing true label; 1 = the "
        "paper's loss")
    class_frequency_power: float = Field(
        0.0, ge=0.0, le=1.0, description="sigmoid and asymmetric: weight each class's terms by (train_frequency + 1) "
        "** -power (data.train's classes.tsv), normalised to a mean of 1 over classes, so rare classes count more; "
        "0 = every class alike (the paper's)")

    @model_validator(mode="before")
    @classmethod
    def _softmax_means(cls, data: object) -> object:
        """Softmax always averages over images: its reduction defaults to "mean" (saved configs then reload)."""
        if isinstance(data, dict) and data.get("name") == "softmax" and "reduction" not in data:
            return {**data, "reduction": "mean"}
        return data

    @model_validator(mode="after")
    def _multi_label_options(self) -> LossConfig:
        if self.name == "softmax" and (self.negative_weight != 1.0 or self.class_frequency_power != 0.0):
            raise ValueError("loss.negative_weight and loss.class_frequency_power apply to the multi-label losses "
                             "(sigmoid, asymmetric); loss.name=softmax has no negative terms to weight")
        return self

    @property
    def activation(self) -> Literal["sigmoid", "softmax"]:
        """How the logits become probabilities: a sigmoid per class for both multi-label losses."""
        return "softmax" if self.name == "softmax" else "sigmoid"


class TrainConfig(Section):
    """The loop: how many steps, how big, in what precision."""

    global_batch_size: PositiveInt = 256
    micro_batches: PositiveInt = Field(1, description="gradient accumulation: split each rank's batch into this many")
    max_micro_batch_size: PositiveInt | None = Field(
        None, description="instead of micro_batches: the most images one forward pass holds (a memory bound); each "
        "rank accumulates the fewest equal micro-batches within it, so fewer workers run more of them")
    total_steps: PositiveInt = 1000
    precision: Literal["fp32", "bf16"] = Field(
        "bf16", description="bf16 = autocast to bfloat16 (CPU or CUDA); chosen by tests/benchmarks/train_step.py"
    )
    channels_last: bool = Field(True, description="NHWC activations; with bf16 the fastest on CPU (benchmark)")
    compile: bool = False
    ema_decay: float | None = Field(0.9999, ge=0.0, lt=1.0, description="Polyak averaging; None disables")
    ema_warmup: bool = Field(True, description="use min(decay, (1+n)/(10+n)) so early EMA is not stuck at init")
    log_every: PositiveInt = 10
    nonfinite: Literal["error", "skip"] = Field("error", description="NaN/Inf loss or grads: stop, or skip+count")
    log_samples: bool = Field(
        False, description="audit trail: each rank writes the keys it trained on to <run>/samples/ at checkpoints"
    )
    seed: int = 0
    freeze_backbone_steps: int = Field(
        0, ge=0, description="fine-tuning: train only the head for the first N steps (backbone weights and "
        "BatchNorm statistics unchanged)")
    freeze_batchnorm: bool = Field(
        False, description="BatchNorm normalises with its running statistics and leaves them as they are (eval "
        "mode); its scale and offset still train")


class CheckpointConfig(Section):
    """Checkpoints under <run>/checkpoints/step-NNNNNNNNN/, each published by its COMMIT marker, written last
    (<run>/checkpoints/LATEST, written after it, only names the newest for people and tools).

    Format: `pipeline.checkpoint.format`; cadence, retention and background upload: `pipeline.checkpoint.checkpointer`.
    """

    every_steps: PositiveInt = 1000
    keep_last: PositiveInt = 3
    keep_every: int = Field(0, ge=0, description="also keep every step divisible by this; 0 = none")
    background: bool = Field(True, description="upload in a background thread so training does not stall")


class EvalConfig(Section):
    """MAP@K evaluation on the dense held-out set."""

    k: PositiveInt = 100
    orientation: Literal["class", "image"] = Field(
        "class", description="the headline MAP@K, first in the console summary and the report's title: per class "
        "(ranks images per class, the paper's) or per image (ranks classes per image); both are always recorded"
    )
    class_weights: Literal["uniform", "train_frequency", "classes_file"] = Field(
        "uniform", description="MAP's per-class weights: uniform, train_frequency (classes.tsv's train_frequency "
        "column), or classes_file (the weight column of data.eval's classes.tsv)",
    )
    weights: Literal["ema", "raw"] = "ema"
    batch_size: PositiveInt = 64
    max_images: int | None = Field(None, ge=1, description="evaluate only the first N eval images")
    threshold_min_positives: PositiveInt = Field(
        5, description="per-class decision thresholds (max F1 on the eval set): a class with fewer positives there "
        "gets the global threshold (max F1 of all classes' decisions pooled)")
    poll_seconds: PositiveFloat = 30.0
    with_training: bool = Field(False, description="launch the checkpoint-watching evaluator alongside training")
    resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="Ray custom resources of the evaluator actor and of each --workers task, "
        "e.g. {evaluator: 1} on the infra/ clusters (keeps it off training GPUs)",
    )


class ExportConfig(Section):
    """jobs/export_model.py: a checkpoint as a model package (`pipeline.models.package`), with checked programs."""

    formats: list[Literal["safetensors", "torch_export", "onnx"]] = Field(
        default_factory=lambda: ["safetensors", "torch_export", "onnx"],
        description="what to write: safetensors (the weights + model.json, always), torch_export (model.pt2), "
        "onnx (model.onnx; needs the 'export' extra)",
    )
    weights: Literal["ema", "raw"] = Field("ema", description="the Polyak-averaged (EMA) or the raw weights")
    image_size: int | None = Field(None, ge=71, description="input side of the exported programs; None = the "
                                   "checkpoint's data.image_size")
    opset: int = Field(18, ge=18, description="ONNX opset (the dynamo exporter needs >= 18)")
    check_images: int = Field(8, ge=2, description="real images the programs are checked on (at batch sizes 1 and "
                              "this), from export.check_data")
    check_data: str | None = Field(None, description="dataset prefix of those images; None = the checkpoint's "
                                   "data.eval, else its data.train")
    tolerance: PositiveFloat = Field(1e-4, description="largest |program - eager| logit difference accepted")

    @model_validator(mode="after")
    def _weights_always(self) -> ExportConfig:
        if "safetensors" not in self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"export.formats={self.formats} must list safetensors (the package's weights) and no "
                             "format twice")
        return self


class PredictConfig(Section):
    """Batch prediction on Ray Data (jobs/predict.py, pipeline.inference): images in, top-k classes and labels out."""

    model: str | None = Field(None, description="a run directory, a checkpoint URL or an exported model package; "
                              "None = run.storage/run.name (its latest complete checkpoint)")
    weights: Literal["ema", "raw"] = Field("ema", description="the checkpoint's Polyak-averaged or raw weights")
    input: str | None = Field(None, description="a dataset prefix of shards (any split), a folder of images, or a "
                              ".txt/.csv file of image URLs (any fsspec URL)")
    input_kind: Literal["auto", "shards", "folder", "urls"] = Field(
        "auto", description="auto: shards when input/manifest.json exists, folder for a directory, urls for a file")
    output: str | None = Field(None, description="URL of the output folder (part files, failures, summary)")
    format: Literal["parquet", "jsonl"] = "parquet"
    top_k: PositiveInt = Field(5, description="class names and scores kept per image, best first")
    batch_size: PositiveInt = Field(64, description="images per model call (and per decode task)")
    concurrency: PositiveInt = Field(1, description="model replicas (Ray Data actors), each loading the model once")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per model replica (fractions share a GPU)")
    num_cpus: PositiveFloat = Field(1.0, description="CPUs per model replica (its torch threads)")
    decode_cpus: PositiveFloat = Field(1.0, description="CPUs per decode task (decoding runs in Ray tasks beside "
                                       "the replicas)")
    rows_per_part: PositiveInt = Field(10_000, description="images per output part for folders and URL lists "
                                       "(shards: one part per shard); a re-run skips finished parts")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32 scores as the evaluator does (the thresholds were fitted on those); bf16 autocast "
        "is faster on CPUs with bf16 units and on GPUs")
    progress: bool = Field(True, description="a progress bar with images/s on stderr")


class ClusterConfig(Section):
    """Ray Train scaling: one DDP rank per worker."""

    address: str | None = Field(None, description="Ray address; None = RAY_ADDRESS or a local cluster")
    num_workers: PositiveInt | list[PositiveInt] = Field(
        1, description="DDP ranks: a number, or [min, max] for elastic training (starts once min workers fit, goes "
        "on with fewer after a lost node, grows back up to max; each change resumes from the latest checkpoint)")
    resize_check_s: PositiveFloat = Field(
        60.0, description="elastic: how often Ray Train looks for room to grow the worker group (a grow restarts "
        "the group from the latest checkpoint)")
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: float = Field(1.0, ge=0.0)
    max_failures: int = Field(3, ge=-1, description="restarts from the last checkpoint after real failures (a "
                              "crash, a lost worker or node, a stall); -1 = unlimited. Preemptions do not count")
    max_preemptions: int = Field(-1, ge=-1, description="restarts after preemption notices (a Ray node drain or "
                                 "SIGTERM: checkpointed, nothing redone), counted apart from max_failures "
                                 "(Ray Train's max_preemption_failures); -1 = unlimited")
    preemption_poll_s: PositiveFloat = Field(
        5.0, description="how often the ranks ask Ray Train whether one of their nodes is being drained "
        "(ray.train.get_preemption_info, a barrier), and how often Ray's watcher polls the drains")
    preemption_poll_budget: float = Field(
        0.005, gt=0.0, le=1.0, description="the most of the training time those polls may take (0.005: 0.5%); "
        "where a poll costs more than preemption_poll_s allows, the ranks poll less often")
    stall_timeout_s: PositiveFloat = Field(
        60.0, description="a worker that leaves Ray Train's health check (polled every 2 s) unanswered this long, "
        "frozen or cut off, is declared dead and the group restarts from the last checkpoint (Ray's default: 600)")
    collective_timeout_s: PositiveInt = Field(
        900, description="how long a rank may wait in one collective for its peers (torch process group timeout); "
        "above storage's outage budget, since a rank that waits out a storage outage keeps its peers waiting")

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list) and (len(value) != 2 or value[0] > value[1]):
            raise ValueError("must be a number or a [min, max] pair with min <= max")
        return value

    @property
    def world_sizes(self) -> range:
        """Every number of workers the run may have: one, or min..max for elastic training."""
        low, high = self.num_workers if isinstance(self.num_workers, list) else (self.num_workers,) * 2
        return range(low, high + 1)


class TrackingConfig(Section):
    """Experiment tracking (`pipeline.tracking`): training's scalars and config, and the evaluator's MAP@K and
    report, in one tracked run per run directory (its id kept in <run>/tracking.json)."""

    backend: Literal["none", "mlflow", "wandb"] = Field(
        "none", description="none, mlflow or wandb (both need the 'tracking' extra)")
    uri: str | None = Field(
        None, description="mlflow: the tracking server URI (None = MLFLOW_TRACKING_URI, else MLflow's local "
        "default); wandb: the server's base URL (None = WANDB_BASE_URL, else W&B's cloud)")
    project: str = Field("xception", min_length=1, description="the MLflow experiment or W&B project")
    entity: str | None = Field(None, description="wandb: the team or user (None = the API key's default)")
    run_name: str | None = Field(None, min_length=1, description="the tracked run's display name; None = run.name")
    tags: dict[str, str] = Field(default_factory=dict, description="MLflow run tags; W&B tags 'key:value'")
    close_timeout_s: PositiveFloat = Field(
        30.0, description="at the end, how long to wait for queued log calls to reach the tracker (they are sent "
        "by a background thread, so training never waits for them)")


class RunConfig(Section):
    """Where a run's checkpoints, reports and logs go: <storage>/<name>/."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    storage: str = Field("./runs", description="URL under which the run directory is created")


class Config(Section):
    """Everything a job reads: training, evaluation, prediction, shard writing."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    shards: ShardsConfig = Field(default_factory=ShardsConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        train = self.train
        check_batch_splits(train.global_batch_size, self.cluster.world_sizes, train.micro_batches,
                           train.max_micro_batch_size)
        if self.loss.name == "softmax" and self.loss.reduction != "mean":
            raise ValueError(f"loss.reduction={self.loss.reduction} applies to the multi-label losses only; "
                             "loss.name=softmax always averages over images (leave loss.reduction unset or 'mean')")
        if self.cluster.collective_timeout_s <= self.storage.outage_budget_s:
            raise ValueError(
                f"cluster.collective_timeout_s={self.cluster.collective_timeout_s} must exceed "
                f"storage.outage_budget_s={self.storage.outage_budget_s}: a rank that waits out a storage outage keeps "
                "its peers waiting in the next collective, which would time out first")
        if self.cluster.use_gpu and self.cluster.gpus_per_worker == 0:
            raise ValueError("cluster.use_gpu=true needs cluster.gpus_per_worker > 0")
        return self

    @property
    def head_bias(self) -> float:
        """The initial logit bias, with 'auto' resolved to the class prior -log(C) for the multi-label losses."""
        if self.model.head_bias != "auto":
            return float(self.model.head_bias)
        return -math.log(self.model.num_classes) if self.loss.activation == "sigmoid" else 0.0

    @property
    def run_dir(self) -> str:
        """The run's directory URL: <run.storage>/<run.name> (checkpoints/, reports/, tensorboard/)."""
        return f"{self.run.storage.rstrip('/')}/{self.run.name}"

    def batch_split(self, world_size: int) -> BatchSplit:
        """At `world_size` ranks (`ctx.world_size`): each rank's batch and micro-batches; `BatchSplitError` (a
        ValueError) saying why not. The global batch is the same at every size."""
        train = self.train
        return split_batch(train.global_batch_size, world_size, train.micro_batches, train.max_micro_batch_size)

    @property
    def scaled_lr(self) -> float:
        """The base learning rate after scaling from reference_batch_size to global_batch_size."""
        ratio = self.train.global_batch_size / self.optimizer.reference_batch_size
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.optimizer.lr_scaling]
        return self.optimizer.lr * scale
