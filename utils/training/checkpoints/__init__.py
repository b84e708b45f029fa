"""The persistence seam: checkpoint folders as durable files, the background writer, the format version,
sharded (FSDP) checkpoints, which checkpoint a run resumes, and the ownership of an output folder."""
from .checkpoint import checkpoints_folder, load_checkpoint, run_folder_of, step_folders
from .checkpoint_format import FORMAT_VERSION, META_KEY
from .checkpoint_settings import CheckpointSettings
from .checkpoint_writer import (CheckpointWriteError, CheckpointWriter, WAIT_NOTICE_AFTER_S, WRITER_NICENESS,
                                WRITER_THREAD_PREFIX)
from .ownership import OutputDirLock, claim_run_id
from .resume import resume
from .run_checkpoints import RunCheckpoints, load_model_and_optimizer

__all__ = ["CheckpointSettings", "CheckpointWriteError", "CheckpointWriter", "FORMAT_VERSION", "META_KEY",
           "OutputDirLock", "RunCheckpoints", "WAIT_NOTICE_AFTER_S", "WRITER_NICENESS", "WRITER_THREAD_PREFIX",
           "checkpoints_folder", "claim_run_id", "load_checkpoint", "load_model_and_optimizer", "resume",
           "run_folder_of", "step_folders"]
