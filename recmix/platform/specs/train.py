"""`kind: train`: one model trained by Ray Train workers (DDP) on a prepared dataset, evaluated, published."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from .base import StrictModel
from .cluster import ClusterConfig
from .data import DatasetConfig, Name, StorageConfig, Uri, check_uri
from .embedding import EmbeddingConfig
from .model import ModelConfig
from .w8a16 import W8A16Config

Workers = Annotated[int, Field(ge=1, le=4096)]


class OptimizerName(str, Enum):
    adagrad = "adagrad"
    adamw = "adamw"


class LRSchedule(str, Enum):
    constant = "constant"
    linear = "linear"   # lr * (1 - step / (epochs x steps per epoch)): 0 after the spec's `epochs`


class OptimizerConfig(StrictModel):
    """One optimizer for all parameters (embedding tables included, dense gradients). With `schedule: linear`
    the horizon is the spec's `epochs`, wherever early stopping ends the run; parameter-server rows follow their
    own `embedding.optimizer`."""

    name: OptimizerName = OptimizerName.adamw
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    schedule: LRSchedule = LRSchedule.constant


class EarlyStopping(StrictModel):
    """Stop after `patience` epochs in a row without a better valid AUC (task 0; 0 = at the first such epoch);
    the best epoch's weights are kept."""

    patience: Annotated[int, Field(ge=0, le=1000)] = 2


class ScalingConfig(StrictModel):
    """Ray Train workers. `workers: [min, max]` is elastic: the run starts with what the cluster can place
    (at least min) and grows up to max. `batch_size` is global: each worker takes batch_size / workers rows."""

    workers: Union[Workers, tuple[Workers, Workers]] = 1
    # Fractional CPUs leave logical CPUs to the Ray Data read tasks that feed the workers (a 2-core box
    # with 4 logical CPUs and 2 x 1-CPU workers still has 2 for Data).
    cpus_per_worker: Annotated[float, Field(gt=0, le=1024)] = 1.0
    use_gpu: bool = False

    @field_validator("workers")
    @classmethod
    def _range(cls, v):
        if isinstance(v, tuple) and v[0] > v[1]:
            raise ValueError(f"workers [min, max] needs min <= max, got [{v[0]}, {v[1]}]")
        return v

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers


class CheckpointConfig(StrictModel):
    """Rank 0 checkpoints every `every_steps` optimizer steps (None: epoch ends only) and at each epoch end;
    the newest `keep` stay in the run's storage folder."""

    every_steps: Optional[Annotated[int, Field(ge=1, le=10**9)]] = None
    keep: Annotated[int, Field(ge=1, le=1000)] = 2


class FailureConfig(StrictModel):
    """Worker-group restarts from the latest checkpoint before the run fails."""

    max_failures: Annotated[int, Field(ge=0, le=1000)] = 0


class SparseMode(str, Enum):
    pass_ = "pass"
    batch = "batch"


class SparseTraining(StrictModel):
    """How the workers train parameter-server tables (with `embedding:`). `pass` (as in the paper): a pass of
    `pass_batches` batches pulls its ids once into the worker's working set, its steps train against it with no
    remote call, and its updates are pushed at the pass end while the next pass's pull overlaps training.
    `batch`: a pull and a push per step."""

    mode: SparseMode = SparseMode.pass_
    pass_batches: Annotated[int, Field(ge=1, le=1_000_000)] = 32
    hbm_rows: Annotated[int, Field(ge=1, le=2**40)] = 1 << 20   # most rows one working set may hold


class TrainSpec(StrictModel):
    kind: Literal["train"]
    dataset: DatasetConfig
    model: ModelConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 512
    eval_batch_size: Annotated[int, Field(gt=0, le=1_000_000)] = 4096
    epochs: Annotated[int, Field(gt=0, le=10_000)] = 10
    early_stopping: EarlyStopping = EarlyStopping()
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # torch intra-op threads per worker; None keeps torch's default. 1 is fastest for small models on a busy machine.
    threads: Optional[Annotated[int, Field(gt=0, le=1024)]] = None
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    failure: FailureConfig = FailureConfig()
    # Ray Train run name: checkpoints live in <output>/checkpoints/<name>/; rerunning the same spec resumes it.
    name: Name = "train"
    # Outputs: <output>/metrics.json, <output>/report.json, <output>/model.pt (best dense state_dict,
    # torch.load(weights_only=True)), <output>/artifact/<version>/ + <output>/artifact/LATEST (docs/training.md).
    output: Uri
    storage: StorageConfig = StorageConfig()
    # The weights this run starts from: another run's output folder (its model.pt) or a model artifact. An
    # S-P MoE layer whose source is the dense pSwiGLU starts as its hidden units split into experts ("first
    # enlarge, then sparse", docs/models.md); every other tensor must match in name and shape. A resumed
    # run's own checkpoint takes precedence.
    init_from: Optional[Uri] = None
    # Present = the sparse tables live in parameter-server shards (Ray actors) instead of the model. The
    # tables are the dataset schema's; `sparse` says how workers train them.
    embedding: Optional[EmbeddingConfig] = None
    sparse: SparseTraining = SparseTraining()
    # Present = the artifact also carries W8A16 weights of the best model (`w8a16.pt`), loaded with
    # `load_artifact(uri, quant="w8a16")`; the float weights stay the reference.
    quantize: Optional[W8A16Config] = None
    # Where the run happens when the spec is run alone (inside a pipeline, the pipeline's cluster).
    cluster: ClusterConfig = ClusterConfig()

    @field_validator("output", "init_from")
    @classmethod
    def _uri(cls, v: Optional[str]) -> Optional[str]:
        return v if v is None else check_uri(v)

    @model_validator(mode="after")
    def _divisible(self) -> "TrainSpec":
        w = self.scaling.max_workers
        if self.init_from is not None and self.embedding is not None:
            raise ValueError("init_from needs local embedding tables: a parameter-server run's tables live in its "
                             "shards, not in the source's state_dict (drop `embedding` or `init_from`)")
        if self.batch_size < w:
            raise ValueError(f"batch_size {self.batch_size} is smaller than scaling.workers {w} (each worker needs rows)")
        return self
