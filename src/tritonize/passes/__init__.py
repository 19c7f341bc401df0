"""fx graph rewrites: each family's patterns (cleanup, attention, linear, norm) replace sub-graphs of a
TorchDynamo graph by `tritonize.ops` calls; `registry` holds them and is the public way to add more.

Importing this package registers the built-in patterns. passes/ never imports triton.
"""

# Registers the built-ins. Within a stage patterns run in import order: linear (which takes a
# following residual add into its epilogue) before norm (which takes the add otherwise), the
# sibling-linear merge after the other clean-ups.
from tritonize.passes import attention, cleanup, linear, norm, sibling_linears  # noqa: F401
from tritonize.passes.registry import (
    ADD,
    DEFAULT_REGISTRY,
    DIV,
    MUL,
    STAGES,
    Pattern,
    Registry,
    Reject,
    arg,
    check,
    check_tensor,
    equal,
    fake,
    is_call,
    is_cast,
    is_number,
    operands,
    register_pattern,
    replace,
    run_passes,
    same_shape,
    sole_user,
    static_int,
)
from tritonize.passes.sibling_linears import pack_sibling_linears

__all__ = [
    "ADD", "DEFAULT_REGISTRY", "DIV", "MUL", "STAGES", "Pattern", "Registry", "Reject", "arg", "check",
    "check_tensor", "equal", "fake", "is_call", "is_cast", "is_number", "operands", "pack_sibling_linears",
    "register_pattern", "replace", "run_passes", "same_shape", "sole_user", "static_int",
]
