"""Versioned weight broadcast from the learner to the generators (see :mod:`ray_rlhf.sync.base`)."""

from ray_rlhf.sync.base import LoadReport, SyncResult, WeightSyncError, broadcast, verify
from ray_rlhf.sync.checksum import state_dict_checksum

__all__ = ["LoadReport", "SyncResult", "WeightSyncError", "broadcast", "verify", "state_dict_checksum"]
