"""Exports: snapshots and clones served as block devices (NBD, later iSCSI) and mounted."""
