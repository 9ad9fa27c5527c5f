"""`python -m services.model_a`: the model_a ONNX model service (see services/common/settings.py for flags)."""

from pathlib import Path

from services.common.model_node import main
from services.common.topology import DEFAULT_PORTS, MODEL_A

if __name__ == "__main__":
    main(
        MODEL_A,
        port=DEFAULT_PORTS[MODEL_A],
        model_dir=Path(__file__).parent / "models",
        description="Serve every ONNX model under the model directory over the Open Inference Protocol.",
    )
