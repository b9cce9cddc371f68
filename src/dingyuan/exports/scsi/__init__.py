"""The transport-independent SCSI layer of the iSCSI target: SPC-4 primary commands and SBC-3
block commands over a :class:`~dingyuan.exports.blockdev.BlockDevice`.

The transport decodes PDUs and calls :meth:`ScsiTarget.execute` with the LUN, the CDB and the
Data-Out it received; it gets back a :class:`Response` (status, Data-In, sense data). Module map:
``sense`` (status and sense data), ``command`` (the command table's row), ``sbc`` (block
commands), ``inquiry``, ``modes``, ``reservations``, ``spc`` (the other primary commands) and
``target`` (dispatch, unit attentions, the LUN map).
"""

from dingyuan.exports.scsi.target import LogicalUnit, Nexus, Response, ScsiTarget

__all__ = ["LogicalUnit", "Nexus", "Response", "ScsiTarget"]
