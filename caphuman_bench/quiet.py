"""A quiet console and a complete log: third-party messages that tell a user nothing stay off the
terminal and go to the run's `log.txt`.

`quiet_console()` holds for a whole command: Python warnings become log records (`py.warnings`), and
each message of `NOISE` is taken off the logger that sends it. `run_log(path)` adds the run's log
file for as long as a command works on that run: every warning, the noise included, our own INFO
lines, and what MediaPipe's C++ code printed (`native_stderr_logged`).

Anything not in `NOISE` still reaches the console as before (a warning may carry information).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Noise:
    logger: str  # the logger that sends it (the module that logs it)
    pattern: str  # searched in the message
    why: str  # why it tells a user nothing


# Each seen on smoke runs (diffusers 0.42.1, transformers 5.24.0, peft 0.21.2).
NOISE = (
    Noise("diffusers.models.modeling_utils", r"that should be kept in float32: \[\]",
          "ModelMixin.to() warns on every dtype cast, even when no module has to stay in float32 (the list it "
          "prints is empty); caphuman, instantid, the IP-Adapter and LoRA cards print it once per model"),
    Noise("diffusers.loaders.ip_adapter", r"image_encoder is not loaded since `image_encoder_folder=None`",
          "the IP-Adapter cards (instantid, ip_adapter_faceid*) hand the pipeline their own face embeddings by "
          "design and never pass it an image to encode"),
    Noise("diffusers.loaders.lora_base", r"No LoRA keys associated to CLIPTextModel",
          "the LoRA files of lora, photomaker and ip_adapter_faceid* adapt the UNet only; diffusers says itself "
          "that this is safe to ignore then"),
)

NATIVE_LOGGER = "caphuman_bench.native_stderr"
LIBRARY_LOGGERS = ("diffusers", "transformers")  # they do not propagate to the root logger: the file is added to them
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_noise(record: logging.LogRecord) -> bool:
    return any(record.name == n.logger and re.search(n.pattern, record.getMessage()) for n in NOISE)


class _OffTheConsole(logging.Filter):
    """On each logger of `NOISE`: a noise record goes to the run's log file (when one is open), nowhere else."""

    def __init__(self) -> None:
        super().__init__()
        self.log_file: logging.Handler | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if not is_noise(record):
            return True
        if self.log_file is not None and record.levelno >= self.log_file.level:
            self.log_file.handle(record)
        return False


class _CurrentStderr(logging.StreamHandler):
    """`logging.lastResort` made explicit: the message alone, to whatever sys.stderr is when the record
    comes (Rich's progress bar swaps it to draw above the bar)."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


_OFF_THE_CONSOLE = _OffTheConsole()


@contextmanager
def quiet_console() -> Iterator[None]:
    """For one command: `NOISE` off the console, Python warnings through logging (so a run's log file
    gets them too), and the console showing every other warning as Python would."""
    loggers = {logging.getLogger(n.logger) for n in NOISE}
    console = _CurrentStderr()
    root = logging.getLogger()
    for logger in loggers:
        logger.addFilter(_OFF_THE_CONSOLE)
    root.addHandler(console)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(console)
        for logger in loggers:
            logger.removeFilter(_OFF_THE_CONSOLE)


@contextmanager
def run_log(path: str | os.PathLike) -> Iterator[Path]:
    """Append this command's log to `path` (a run's `log.txt`): warnings of every library (the noise
    included), Python warnings, and INFO lines of caphuman_bench (MediaPipe's native output among them)."""
    path = Path(path)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    ours, root = logging.getLogger("caphuman_bench"), logging.getLogger()
    level = ours.level
    console = None if root.handlers else _CurrentStderr()  # a handler on root retires logging.lastResort
    targets = [root, *map(logging.getLogger, LIBRARY_LOGGERS)]
    for logger in targets:
        logger.addHandler(handler)
    if console:
        root.addHandler(console)
    previous, _OFF_THE_CONSOLE.log_file = _OFF_THE_CONSOLE.log_file, handler
    ours.setLevel(logging.INFO)
    logging.getLogger(__name__).info("command: %s", shlex.join(["caphuman-bench", *sys.argv[1:]]))  # where each command's lines begin
    try:
        yield path
    finally:
        ours.setLevel(level)
        _OFF_THE_CONSOLE.log_file = previous
        for logger in targets:
            logger.removeHandler(handler)
        if console:
            root.removeHandler(console)
        handler.close()


_NATIVE_LOCK = threading.Lock()


@contextmanager
def native_stderr_logged(source: str) -> Iterator[None]:
    """What C/C++ code writes to file descriptor 2 inside the block becomes INFO lines of
    `caphuman_bench.native_stderr` ("<source>: <line>"): the run's log file keeps them, the console
    does not show them. Python's own writes (sys.stderr, Rich's progress bar) still reach the terminal.

    Why not environment variables: MediaPipe 0.10.21 logs through absl and TFLite's own logger, which
    neither GLOG_minloglevel nor TF_CPP_MIN_LOG_LEVEL silences (tried on a smoke run). In a worker
    process no log file is open, and the lines are dropped."""
    with _NATIVE_LOCK, tempfile.TemporaryFile() as sink:
        python_stderr = sys.stderr
        python_stderr.flush()
        terminal = os.dup(2)
        swapped = _writes_to_fd(python_stderr, 2)
        if swapped:
            sys.stderr = os.fdopen(os.dup(terminal), "w", buffering=1, encoding=getattr(python_stderr, "encoding", None),
                                   errors="backslashreplace")
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(terminal, 2)
            os.close(terminal)
            if swapped:
                sys.stderr.close()
                sys.stderr = python_stderr
            sink.seek(0)
            log = logging.getLogger(NATIVE_LOGGER)
            for line in sink.read().decode("utf-8", "replace").splitlines():
                if line.strip():
                    log.info("%s: %s", source, line)


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # pytest's capture, a StringIO: not a descriptor
        return False
