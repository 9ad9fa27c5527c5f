"""`python -m services.model_b`: the model_b ONNX model service (see services/common/settings.py for flags)."""

from pathlib import Path

from services.common.model_service import main

if __name__ == "__main__":
    main(
        "model_b",
        port=8031,
        model_dir=Path(__file__).parent / "models",
        description="Serve every ONNX model under the model directory over the Open Inference Protocol.",
    )
