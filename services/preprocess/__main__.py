"""`python -m services.preprocess`: the digits preprocessor, a Python model (see services/common/settings.py)."""

from pathlib import Path

from services.common.model_node import main
from services.common.topology import DEFAULT_PORTS, PREPROCESS

if __name__ == "__main__":
    main(
        PREPROCESS,
        port=DEFAULT_PORTS[PREPROCESS],
        model_dir=Path(__file__).parent / "models",
        description="Turn raw digit images into standardized features, served over the Open Inference Protocol.",
        runtime="python",
    )
