"""Data sets for training: tensors on the device, seeded batch order, augmentation.

Not part of the core package (``capsnet`` imports without it): these modules need numpy
(seed mixing), and torchvision to download MNIST.

    registry       DatasetSpec, ExampleSet, register_dataset/get_dataset: how a data set plugs in
    mnist          MNIST's IDX files, checked on reading
    idx            the IDX file format
    image_set      ImageSet: uint8 images and labels on one device
    sampling       epoch order, sharding over processes, per-step seeds
    augmentation   the paper's random shift
"""

from capsnet.datasets import mnist
from capsnet.datasets.augmentation import PAPER_MAX_SHIFT, ShiftedImages, random_shift, shift_images
from capsnet.datasets.image_set import ImageSet
from capsnet.datasets.mnist import (
    DATA_DIR_ENV,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    load_mnist,
    resolve_data_dir,
)
from capsnet.datasets.registry import (
    DataOptions,
    DatasetSpec,
    ExampleSet,
    dataset_names,
    get_dataset,
    register_dataset,
)
from capsnet.datasets.sampling import derive_seed, epoch_order, num_batches, shard, step_generator

MNIST = register_dataset(
    DatasetSpec(
        name="mnist",
        summary="MNIST handwritten digits, 60,000 training and 10,000 test images, 28x28",
        num_classes=mnist.NUM_CLASSES,
        image_shape=mnist.IMAGE_SHAPE,
        load=mnist.load_split,
    )
)

__all__ = [
    "DATA_DIR_ENV",
    "MNIST",
    "PAPER_MAX_SHIFT",
    "DataOptions",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ExampleSet",
    "ImageSet",
    "ShiftedImages",
    "dataset_names",
    "derive_seed",
    "epoch_order",
    "get_dataset",
    "load_mnist",
    "num_batches",
    "random_shift",
    "register_dataset",
    "resolve_data_dir",
    "shard",
    "shift_images",
    "step_generator",
]
