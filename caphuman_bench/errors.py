"""One exception type for errors the user can fix; the CLI prints it as one line and exits 2."""


class BenchError(Exception):
    """A clear, user-facing error: names the file and field at fault."""


class MissingWeightsError(BenchError):
    """A weights file a method or metric needs is not present locally."""


class FaceNotFoundError(BenchError):
    """No face in a photo a head condition is made from: that identity's tasks fail, the run goes on."""
