"""`python -m services.preprocess`: the digits preprocessing service (see services/common/settings.py)."""

from pathlib import Path

from services.common.model_node import main
from services.common.topology import DEFAULT_PORTS, PREPROCESS
from services.preprocess.model import preprocess_servable

if __name__ == "__main__":
    main(
        PREPROCESS,
        port=DEFAULT_PORTS[PREPROCESS],
        model_dir=Path(__file__).parent / "models",
        description="Turn raw digit images into standardized features, served over the Open Inference Protocol.",
        factory=preprocess_servable,
        filename="stats.json",
    )
