"""The structures of an update — row, column, sparse, tap column — and the registry that names them.

Each structure is one :class:`Update` subclass that owns every rule about itself (see :mod:`.base`);
:data:`STRUCTURES` maps names to classes. Add one from your own code::

    from grft_vision.tuner.structures import RowUpdate, register_structure

    @register_structure
    class BlockUpdate(RowUpdate):          # k contiguous output rows chosen as one block
        structure = "block"
        ...

and ``GRFTConfig(structure="block")`` selects, trains, saves, loads, merges and exports it.
"""
from .base import FILE_SUFFIXES, STRUCTURES, LayerGeometry, Update, register_structure, top_k_sorted
from .column import ColumnUpdate
from .row import RowUpdate
from .sparse import SparseUpdate
from .tap_column import TapColumnUpdate

__all__ = ["STRUCTURES", "FILE_SUFFIXES", "LayerGeometry", "Update", "register_structure", "top_k_sorted",
           "RowUpdate", "ColumnUpdate", "SparseUpdate", "TapColumnUpdate", "create_update"]


def create_update(structure: str, weight, indices, **options) -> Update:
    """The :class:`Update` of the registered ``structure`` for ``weight`` (see :class:`Update`'s arguments).

    Raises:
        ConfigError: an unknown structure.
        AdapterError: the structure cannot hold an update of this weight (e.g. tap columns of a linear layer).
    """
    cls = STRUCTURES.get(structure)
    if not cls.applies_to(tuple(weight.shape)):
        from ...errors import AdapterError

        raise AdapterError(f"structure {structure!r} does not apply to a weight of shape {list(weight.shape)}.")
    return cls(weight, indices, **options)
