"""What every ONNX writer of lowbit does last: check the graph, write it atomically, count its ops."""

from __future__ import annotations

from pathlib import Path

from lowbit.io.atomic import atomic_write_bytes


def write_onnx(proto, path: str | Path) -> tuple[int, dict[str, int]]:
    """``onnx.checker.check_model(proto)``, then the serialized model to ``path`` (temp + fsync + rename);
    returns ``(bytes written, {op_type: count})``."""
    import onnx

    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    atomic_write_bytes(Path(path), data)
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return len(data), ops
