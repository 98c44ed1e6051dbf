"""Loading a run's data set splits onto its device, as its settings say."""

from __future__ import annotations

from capsnet.datasets import DataOptions, ExampleSet, get_dataset, resolve_data_dir
from capsnet.training.config import TrainConfig
from capsnet.training.distributed import DistributedContext, main_rank_first


def load_split(config: TrainConfig, split: str, context: DistributedContext) -> ExampleSet:
    """Split ``split`` ("train", "test" or another evaluation set) of ``config.dataset`` on ``context.device``,
    limited, padded to the network's input and (training split) augmented as ``config``
    says. With several processes and ``download``, rank 0 downloads before the others read.

    Raises:
        DatasetError: naming the missing or damaged file.
    """
    spec = get_dataset(config.dataset)
    options = DataOptions(
        root=resolve_data_dir(config.data_dir),
        download=config.download,
        image_shape=config.model.input_shape,
        max_shift=config.effective_max_shift,
        limit=config.limit_train if split == "train" else config.limit_test,
        test_copies=config.test_copies,
    )
    with main_rank_first(context, enabled=config.download and context.is_distributed):
        return spec.load(options, split, context.device)
