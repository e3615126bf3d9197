"""torch.export programs: loading an archive with the real cause of a failure, the eval-mode module inside, the
training-mode ops that make a program unusable, and the input shape it was exported with. What torch keeps private
(op schemas, the program's signature) is read here and nowhere else."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from zeroquant.errors import ModelLoadError, UnsupportedModelError, brief
from zeroquant.graph.constants import depends_on_input

RESAVE_HINT = ("re-save it with torch.export.save(torch.export.export(model.eval(), (torch.randn(2, C, H, W),), "
               "dynamic_shapes=({0: torch.export.Dim('batch')},)), path)")


class _Muted(logging.Filter):
    """Keeps a logger off stderr, holding on to the exceptions it would have printed with their tracebacks."""

    def __init__(self):
        super().__init__()
        self.errors: list[BaseException] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            self.errors.append(record.exc_info[1])
        return False


def load_export(path: Path) -> torch.export.ExportedProgram:
    """torch.export.load, failing as a ModelLoadError with the real cause."""
    # torch.export.load logs the real cause of a failure (with a traceback) and then raises a vaguer error; and
    # given a path, it warns unless the name ends in .pt2, so it gets an open file.
    muted, logger = _Muted(), logging.getLogger("torch.export")
    logger.addFilter(muted)
    try:
        with path.open("rb") as f:
            program = torch.export.load(f)
    except Exception as e:
        cause = brief(muted.errors[0] if muted.errors else e)
        raise ModelLoadError(f"cannot load torch.export archive {path}: {cause}", RESAVE_HINT) from e
    finally:
        logger.removeFilter(muted)
    return program


def program_module(program: torch.export.ExportedProgram, name: str) -> tuple[nn.Module, tuple[int, int, int] | None]:
    """The program as an eval-mode module, and the C,H,W it was exported with (when static); a program exported in
    training mode is an UnsupportedModelError."""
    module = program.module()  # parameters are get_attr nodes here, not inputs as in program.graph
    training = _training_nodes(module.graph)
    if training:
        raise UnsupportedModelError(
            f"{name} was exported in training mode (node {training[0]} uses batch statistics or dropout)",
            "call model.eval() before torch.export.export",
        )
    # module() makes train()/eval() raise; the graph is fixed in eval form (checked above), so the flag-only
    # nn.Module versions are safe and let callers treat it like any other module.
    del module.train, module.eval
    return module.eval(), _example_shape(program)


def _training_nodes(graph: torch.fx.Graph) -> list[str]:
    """Ops called with training=True (batch_norm, dropout) on the input's data: an exported graph cannot be switched
    to eval(). A batch_norm of parameters alone (weight standardisation) is no training-mode layer."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload) or \
                not depends_on_input(node):
            continue
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.name in ("training", "train"):
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
                if value is True:
                    found.append(node.name)
    return found


def _example_shape(program: torch.export.ExportedProgram) -> tuple[int, int, int] | None:
    """C,H,W of the single image input the program was exported with, when it has one with static sizes."""
    inputs = program.graph_signature.user_inputs
    if len(inputs) != 1:
        return None
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == inputs[0])
    value = node.meta.get("val")
    shape = tuple(getattr(value, "shape", ()))[1:]
    return tuple(shape) if len(shape) == 3 and all(isinstance(s, int) for s in shape) else None
