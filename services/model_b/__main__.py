"""`python -m services.model_b`: the model_b ONNX model service (see services/common/settings.py for flags)."""

from pathlib import Path

from services.common.model_node import main
from services.common.topology import DEFAULT_PORTS, MODEL_B

if __name__ == "__main__":
    main(
        MODEL_B,
        port=DEFAULT_PORTS[MODEL_B],
        model_dir=Path(__file__).parent / "models",
        description="Serve every ONNX model under the model directory over the Open Inference Protocol.",
    )
