"""Recovery: restore, boot, convert, drills."""
