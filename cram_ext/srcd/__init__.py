"""SRCD (Sparse Retrieval in Continuous Dynamics): data generator, transfer tasks and metrics."""
from .generator import (IGNORE_INDEX, KEY_WRITE, OBSERVATION, QUERY, SRCDConfig, SRCDStream,
                        batch_at, collate, generate_sequence, pattern_values)
from .transfer import TransferConfig, generate_transfer_sequence, transfer_batch_at

__all__ = ["IGNORE_INDEX", "KEY_WRITE", "OBSERVATION", "QUERY", "SRCDConfig", "SRCDStream",
           "batch_at", "collate", "generate_sequence", "pattern_values", "TransferConfig",
           "generate_transfer_sequence", "transfer_batch_at"]
