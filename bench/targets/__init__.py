"""What is measured: the mesh's rivals (an all-in-one server of the mesh's own parts, a minimal
hand-written one), the no-network floor in one process, a large model, cost growth."""
