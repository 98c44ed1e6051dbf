"""Data sets for training: tensors on the device, seeded batch order, augmentation.

Not part of the core package (``capsnet`` imports without it): these modules need numpy
(seed mixing), and torchvision to download MNIST.

    registry       DatasetSpec, ExampleSet, register_dataset/get_dataset: how a data set plugs in
    mnist          MNIST's IDX files, checked on reading
    multimnist     MultiMNIST (Sec. 6): overlaid pairs of shifted digits, drawn on the device
    expanded_mnist expanded MNIST (Sec. 5.2): digits at random positions on a 40x40 canvas
    affine_mnist   the affNIST-like test set: MNIST test digits under random affine maps
    cache          generated sets kept on disk between runs, verified on every read
    idx            the IDX file format
    image_set      ImageSet: uint8 images and labels on one device
    sampling       epoch order, sharding over processes, per-step seeds
    augmentation   the paper's random shift
"""

from capsnet.datasets import expanded_mnist, mnist, multimnist
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
        default_max_shift=PAPER_MAX_SHIFT,
    )
)
MULTIMNIST = register_dataset(
    DatasetSpec(
        name="multimnist",
        summary="MultiMNIST (Sec. 6): two MNIST digits of different classes, each shifted by "
        "up to 4 pixels, overlaid on 36x36; training pairs drawn on the fly, 10 fixed test "
        "pairs per test digit",
        num_classes=mnist.NUM_CLASSES,
        image_shape=(1, multimnist.CANVAS, multimnist.CANVAS),
        load=multimnist.load_split,
        labels_per_example=2,
        default_max_shift=multimnist.MAX_SHIFT,
        shift_within_canvas=True,
        default_test_copies=multimnist.DEFAULT_TEST_COPIES,
    )
)
EXPANDED_MNIST = register_dataset(
    DatasetSpec(
        name="expanded-mnist",
        summary="expanded MNIST (Sec. 5.2): each digit at a random position on 40x40; evaluation "
        "sets test (random positions) and affine (affNIST-like)",
        num_classes=mnist.NUM_CLASSES,
        image_shape=(1, expanded_mnist.CANVAS, expanded_mnist.CANVAS),
        load=expanded_mnist.load_split,
        splits=expanded_mnist.SPLITS,
        default_max_shift=expanded_mnist.MAX_SHIFT,
        shift_within_canvas=True,
    )
)

__all__ = [
    "DATA_DIR_ENV",
    "EXPANDED_MNIST",
    "MNIST",
    "MULTIMNIST",
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
